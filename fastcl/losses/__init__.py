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

__all__ = [
    "InfoNCELoss", "NTXentLoss", "SupConLoss",
    "info_nce", "info_nce_ref", "nt_xent", "nt_xent_ref", "supcon", "supcon_ref",
]
