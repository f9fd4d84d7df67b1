"""SimCLR v1 (Chen et al. 2020): NT-Xent between two views' projections, through fastcl.nt_xent.

z = n(g(f(x))) with g: d -> hidden (BN, ReLU) -> out_dim (BN with a scale and no shift, the
official center=False: its bias stays 0). Both views go through f and g in one batch (BN statistics
over both), as the official code. The loss is the paper's mean over the 2N anchors (the official
code sums the two directions, i.e. twice this value).

Official: LARS, lr 0.3 * B / 256, 10 warm-up epochs, B 4096, tau 0.1 (ImageNet) / 0.5 (CIFAR).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl.augment import Recipe
from fastcl.losses import NTXentLoss
from fastcl.methods.base import Method, min_scale_hparam, simclr_color
from fastcl.models import mlp


class SimCLR(Method):
    """SimCLR: NT-Xent between the projections of two augmented views."""

    name = "simclr"
    ring = True
    HPARAMS = {
        "temperature": (0.2, "NT-Xent temperature (SimCLR: 0.1 ImageNet, 0.5 CIFAR; 0.2 learns "
                             "fastest in short runs on small data)"),
        "proj_hidden": (512, "projector hidden width"),
        "proj_dim": (128, "projection (loss) dimension"),
        "min_scale": min_scale_hparam(0.08),
        "jitter_strength": (0.5, "color jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s) (SimCLR: 1.0 "
                                 "ImageNet, 0.5 CIFAR)"),
    }
    DEFAULTS = {**Method.DEFAULTS, "epochs": 20}
    # Linear layers of the projector (SimCLR v2 deepens it).
    projector_layers = 2

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        hidden = [hp["proj_hidden"]] * (self.projector_layers - 1)
        self.projector = mlp([backbone.out_dim, *hidden, hp["proj_dim"]], last_batch_norm=True)
        self.projector[-1].bias.requires_grad_(False)  # zero: scale only, as the official BN
        self.criterion = NTXentLoss(temperature=hp["temperature"], gather=self.gather)

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return self.same_views(image_size, **simclr_color(self.hparams["jitter_strength"]))

    def project(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Both views (B, C, s, s) through backbone and projector in one batch -> z1, z2 (B, D)."""
        return self.projector(self.backbone(torch.cat(views))).chunk(2)

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        z1, z2 = self.project(views)
        return self.criterion(z1, z2)
