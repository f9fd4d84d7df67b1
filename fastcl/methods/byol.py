"""BYOL (Grill et al. 2020): an online network predicts a momentum target network's projection.

    l(v, v') = || n(q(z(f(v)))) - n(sg(z'(f'(v')))) ||^2 = 2 - 2 cos,  loss = l(v1, v2) + l(v2, v1)

batch means; projector z and predictor q are Linear, BN, ReLU, Linear (d -> hidden -> dim and
dim -> hidden -> dim). After each optimizer step the target follows the online encoder and
projector through fastcl.momentum_update with tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2
(fastcl.cosine_schedule from tau_base to 1 over the run's K steps). Asymmetric augmentation: blur
p 1.0 / 0.1, solarize p 0 / 0.2, color jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, flip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl.augment import Recipe
from fastcl.methods.base import Method, min_scale_hparam
from fastcl.methods.mocov1 import momentum_copy
from fastcl.models import mlp


def _regression_loss(p: Tensor, z: Tensor) -> Tensor:
    """(B, D), (B, D) -> mean over the batch of ||n(p) - n(z)||^2 = 2 - 2 cos(p, z), in fp32."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


class BYOL(Method):
    """BYOL: an online network predicts a momentum target network's projection."""

    name = "byol"
    HPARAMS = {
        "momentum_base": (0.996, "target momentum tau_base at step 0, cosine to 1 (BYOL's "
                                 "value; 0.99 and lower learned slower on the digits)"),
        "proj_hidden": (512, "projector and predictor hidden width (4096 on ImageNet)"),
        "proj_dim": (128, "projection dimension (256 on ImageNet)"),
        "min_scale": min_scale_hparam(0.08),
    }
    # BYOL learns slowly at first (no negatives) but its steps are cheap (no queue, one loss per
    # view pair): 90 epochs on the digits took 168 s on 2 idle cores, kNN 0.944 (15 epochs: 0.875).
    DEFAULTS = dict(optimizer="adamw", lr=2e-3, weight_decay=1e-4, batch_size=128, epochs=90,
                    warmup_epochs=1, width=0.5)

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        if not 0.0 <= hp["momentum_base"] <= 1.0:
            raise ValueError(f"momentum_base must be in [0, 1], got {hp['momentum_base']}")
        self.projector = mlp([backbone.out_dim, hp["proj_hidden"], hp["proj_dim"]])
        self.predictor = mlp([hp["proj_dim"], hp["proj_hidden"], hp["proj_dim"]])
        self.target = momentum_copy(nn.Sequential(backbone, self.projector))

    def view_recipes(self, image_size: int) -> list[Recipe]:
        scale = self.crop_range((self.hparams["min_scale"], 1.0))
        common = dict(scale=scale, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2)
        return [Recipe(image_size, blur_p=1.0, solarize_p=0.0, **common),
                Recipe(image_size, blur_p=0.1, solarize_p=0.2, **common)]

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        v1, v2 = views
        # Both views through the online network in one batch (BN statistics over both).
        p1, p2 = self.predictor(self.projector(self.backbone(torch.cat([v1, v2])))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target(torch.cat([v1, v2])).chunk(2)
        return _regression_loss(p1, z2) + _regression_loss(p2, z1)

    def after_step(self, step: int, total_steps: int) -> None:
        tau = fastcl.cosine_schedule(step + 1, total_steps, self.hparams["momentum_base"], 1.0)
        fastcl.momentum_update(self.target, nn.Sequential(self.backbone, self.projector), tau)
