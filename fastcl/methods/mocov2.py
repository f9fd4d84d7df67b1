"""MoCo v2 (Chen et al. 2020): MoCo v1 (queue via fastcl.Queue, keys from a momentum encoder via
fastcl.momentum_update, InfoNCE via fastcl.info_nce, shuffle BN) with an MLP head
(d -> hidden, ReLU -> dim, no BN), temperature 0.2, the cosine learning rate (the trainer's
schedule) and SimCLR-like augmentation: crop 0.2-1, color jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
grayscale 0.2, Gaussian blur p=0.5, flip. Not symmetrized, as the official code.
"""
from __future__ import annotations

from fastcl.augment import Recipe
from fastcl.methods.base import MOCO_V2_COLOR, momentum_copy
from fastcl.methods.mocov1 import MoCoV1
from fastcl.models import mlp


class MoCoV2(MoCoV1):
    """MoCo v2: MoCo v1 with an MLP head, temperature 0.2 and blur in the augmentation."""

    name = "mocov2"
    HPARAMS = {
        **MoCoV1.HPARAMS,
        "temperature": (0.2, "InfoNCE temperature"),
        "mlp_hidden": (512, "hidden width of the MLP head (2048 on ImageNet)"),
    }

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        # v2's head replaces v1's linear one, in the query and (a fresh copy) the key encoder.
        self.head = mlp([backbone.out_dim, hp["mlp_hidden"], hp["dim"]], batch_norm=False)
        self.key_encoder = momentum_copy(backbone, self.head)

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return self.same_views(image_size, **MOCO_V2_COLOR)
