"""Drop-in losses built on the fused ops."""
from fastcl.losses.contrastive import (
    InfoNCELoss,
    NTXentLoss,
    SupConLoss,
    info_nce,
    info_nce_ref,
    nt_xent,
    nt_xent_ref,
    supcon,
    supcon_ref,
)

from fastcl.losses.dino import DINOLoss, dino_loss, dino_loss_ref, dino_loss_sinkhorn

__all__ = [
    "DINOLoss", "dino_loss", "dino_loss_ref", "dino_loss_sinkhorn",
    "InfoNCELoss", "NTXentLoss", "SupConLoss",
    "info_nce", "info_nce_ref", "nt_xent", "nt_xent_ref", "supcon", "supcon_ref",
]
