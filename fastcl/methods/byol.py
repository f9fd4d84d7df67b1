"""BYOL (Grill et al. 2020): an online network predicts a momentum target network's projection.

    l(v, v') = || n(q(z(f(v)))) - n(sg(z'(f'(v')))) ||^2 = 2 - 2 cos,  loss = l(v1, v2) + l(v2, v1)

batch means; projector z and predictor q are Linear, BN, ReLU, Linear without bias (d -> hidden
-> dim and dim -> hidden -> dim), as the official MLP. Each view goes through the networks on its
own (BN statistics per view, as the official code's). After optimizer step k (from 0) the target
follows the online encoder and projector through fastcl.momentum_update with
tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (fastcl.cosine_schedule from tau_base to 1 over
the run's K steps; the official code's target_ema at the step's global_step). Asymmetric
augmentation: blur p 1.0 / 0.1, solarize p 0 / 0.2, color jitter (0.4, 0.4, 0.2, 0.1) p=0.8,
grayscale 0.2, flip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastcl
from fastcl import _checks
from fastcl.augment import Recipe
from fastcl.methods.base import Method, byol_views, min_scale_hparam, momentum_copy, momentum_follow
from fastcl.models import mlp


def _regression_loss(p: Tensor, z: Tensor) -> Tensor:
    """(B, D), (B, D) -> mean over the batch of ||n(p) - n(z)||^2 = 2 - 2 cos(p, z), in fp32
    (fp64 for fp64)."""
    acc = torch.promote_types(p.dtype, torch.float32)
    return (2 - 2 * F.cosine_similarity(p.to(acc), z.to(acc), dim=1)).mean()


class BYOL(Method):
    """BYOL: an online network predicts a momentum target network's projection."""

    name = "byol"
    HPARAMS = {
        "momentum_base": (0.996, "target momentum tau_base at step 0, cosine to 1 (BYOL's value)"),
        "proj_hidden": (512, "projector and predictor hidden width (4096 on ImageNet)"),
        "proj_dim": (128, "projection dimension (256 on ImageNet)"),
        "min_scale": min_scale_hparam(0.08),
    }
    # BYOL learns slowly at first (no negatives) but its steps are cheap (no queue, one loss per
    # view pair): many epochs.
    DEFAULTS = {**Method.DEFAULTS, "epochs": 90}

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        _checks.unit_interval("momentum_base", hp["momentum_base"])
        self.projector = mlp([backbone.out_dim, hp["proj_hidden"], hp["proj_dim"]],
                             last_bias=False)
        self.predictor = mlp([hp["proj_dim"], hp["proj_hidden"], hp["proj_dim"]],
                             last_bias=False)
        self.target = momentum_copy(backbone, self.projector)

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return byol_views(image_size, self.crop_range((self.hparams["min_scale"], 1.0)))

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        v1, v2 = views
        # One view at a time (BN statistics per view), as the official apply_once_fn.
        p1, p2 = (self.predictor(self.projector(self.backbone(v))) for v in (v1, v2))
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)
        return _regression_loss(p1, z2) + _regression_loss(p2, z1)

    def after_step(self, step: int, total_steps: int) -> None:
        tau = fastcl.cosine_schedule(min(step, total_steps), total_steps,
                                     self.hparams["momentum_base"], 1.0)
        momentum_follow(self.target, self.backbone, self.projector, momentum=tau)
