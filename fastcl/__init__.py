"""fastcl: fused, exact kernels for contrastive and self-supervised representation learning.

Importing fastcl never touches CUDA and never imports triton; kernels load on first use.
"""
from fastcl.losses import (
    DINOLoss,
    InfoNCELoss,
    InstDiscNCELoss,
    NTXentLoss,
    SigLIPLoss,
    SupConLoss,
    dino_head_loss,
    dino_loss,
    dino_loss_sinkhorn,
    ibot_patch_loss,
    info_nce,
    nt_xent,
    sampled_info_nce,
    sampled_nce,
    siglip,
    supcon,
    teacher_mean,
)

from fastcl.ops.koleo import koleo
from fastcl.ops.momentum import cosine_schedule, momentum_update
from fastcl.ops.sinkhorn import sinkhorn
from fastcl.memory import MemoryBank, Queue

__version__ = "0.1.0"

__all__ = [
    "DINOLoss", "dino_loss", "dino_loss_sinkhorn", "dino_head_loss", "ibot_patch_loss",
    "teacher_mean",
    "InfoNCELoss", "NTXentLoss", "SupConLoss", "cosine_schedule", "momentum_update",
    "info_nce", "koleo", "nt_xent", "sinkhorn", "supcon",
    "InstDiscNCELoss", "MemoryBank", "Queue", "sampled_info_nce", "sampled_nce",
    "SigLIPLoss", "siglip",
]
