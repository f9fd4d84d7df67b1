"""fastcl: fused, exact kernels for contrastive and self-supervised representation learning.

Importing fastcl never touches CUDA and never imports triton; kernels load on first use.
"""
from fastcl.losses import (
    DINOLoss,
    InfoNCELoss,
    NTXentLoss,
    SupConLoss,
    dino_loss,
    dino_loss_ref,
    dino_loss_sinkhorn,
    info_nce,
    info_nce_ref,
    nt_xent,
    nt_xent_ref,
    supcon,
    supcon_ref,
)

from fastcl.ops.momentum import cosine_schedule, momentum_update
from fastcl.ops.sinkhorn import sinkhorn
from fastcl.memory import (
    InstDiscNCELoss,
    MemoryBank,
    Queue,
    sampled_info_nce,
    sampled_info_nce_ref,
    sampled_nce,
    sampled_nce_ref,
)

__version__ = "0.1.0"

__all__ = [
    "DINOLoss", "dino_loss", "dino_loss_ref", "dino_loss_sinkhorn",
    "InfoNCELoss", "NTXentLoss", "SupConLoss", "cosine_schedule", "momentum_update",
    "info_nce", "info_nce_ref", "nt_xent", "nt_xent_ref", "sinkhorn", "supcon", "supcon_ref",
    "InstDiscNCELoss", "MemoryBank", "Queue",
    "sampled_info_nce", "sampled_info_nce_ref", "sampled_nce", "sampled_nce_ref",
]
