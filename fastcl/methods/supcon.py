"""Supervised contrastive learning (SupCon, Khosla et al. 2020), through fastcl.supcon.

z = n(g(f(x))) with g: d -> hidden (ReLU) -> proj_dim for two views of each image; with the
batch's labels, every other view with the same label is a positive:

    L = mean_i -(1/|P(i)|) sum_{p in P(i)} log( exp(z_i . z_p / tau)
                                                / sum_{a != i} exp(z_i . z_a / tau) )

over the 2B views. Without labels (forward(views) alone) each image is its own class: SimCLR.
SupContrast's code multiplies the loss by tau / 0.07: ``base_temperature`` 0.07 gives that, 0 (the
default) the paper's loss. A supervised metric-learning trainer: the trainer passes the labels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl.augment import Recipe
from fastcl.losses import SupConLoss
from fastcl.methods.base import SUPCON_COLOR, Method, min_scale_hparam
from fastcl.models import mlp


class SupCon(Method):
    """SupCon: supervised contrastive loss over two views with the batch's labels."""

    name = "supcon"
    ring = True
    batch_extras = ("labels",)
    HPARAMS = {
        "temperature": (0.1, "temperature tau"),
        "proj_hidden": (512, "projector hidden width"),
        "proj_dim": (128, "projection (loss) dimension"),
        "base_temperature": (0.0, "0: the paper's loss; 0.07: SupContrast's code (x tau / 0.07)"),
        "min_scale": min_scale_hparam(0.2),
    }
    DEFAULTS = {**Method.DEFAULTS, "epochs": 8}  # SupContrast: SGD lr 0.5 at B 1024, 1000 epochs

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        if hp["base_temperature"] < 0:
            raise ValueError(f"base_temperature must be 0 (off) or > 0, got "
                             f"{hp['base_temperature']}")
        self.projector = mlp([backbone.out_dim, hp["proj_hidden"], hp["proj_dim"]],
                             batch_norm=False)
        self.criterion = SupConLoss(hp["temperature"], gather=self.gather,
                                    base_temperature=hp["base_temperature"] or None)

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return self.same_views(image_size, **SUPCON_COLOR)

    def forward(self, views: list[Tensor], *, epoch: int = 0,
                labels: Optional[Tensor] = None) -> Tensor:
        # Every view through the encoder in one batch (BN statistics over all), as SupContrast.
        z = self.projector(self.backbone(torch.cat(views)))
        z = z.view(len(views), views[0].shape[0], -1).transpose(0, 1)  # (B, V, D)
        return self.criterion(z, labels)
