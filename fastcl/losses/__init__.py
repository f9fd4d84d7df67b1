"""Drop-in losses built on the fused ops, as functions and ``nn.Module``s.

One module per op family for the losses several methods share (``contrastive``: NT-Xent,
InfoNCE, SupCon; ``dino``, with ``dino_head`` fusing the head's last layer; ``bank``: the losses over sampled memory-bank rows), and one named
for its method for a loss only that method uses (``invaspread``, ``simclrv2``, ``simsiam``,
``triplet``). The papers' formulas they are tested against are in fastcl.formulas.
"""
from fastcl.losses.bank import InstDiscNCELoss, sampled_info_nce, sampled_nce
from fastcl.losses.contrastive import (
    InfoNCELoss,
    NTXentLoss,
    SupConLoss,
    info_nce,
    nt_xent,
    supcon,
)

from fastcl.losses.dino import DINOLoss, dino_loss, dino_loss_sinkhorn, teacher_mean
from fastcl.losses.dino_head import dino_head_loss, ibot_patch_loss

__all__ = [
    "DINOLoss", "dino_loss", "dino_loss_sinkhorn", "dino_head_loss", "ibot_patch_loss",
    "teacher_mean",
    "InfoNCELoss", "NTXentLoss", "SupConLoss", "info_nce", "nt_xent", "supcon",
    "InstDiscNCELoss", "sampled_info_nce", "sampled_nce",
]
