"""MoCo v3 (Chen, Xie and He 2021): no queue; each view's prediction against the momentum encoder's
keys of the other view, through fastcl.info_nce (in-batch negatives, every rank's keys with gather).

    ctr(q, k) = CE(n(q) . n(k)^T / tau, labels = the diagonal) * 2 tau
    L = ctr(q1, k2) + ctr(q2, k1)

q = predictor(projector(backbone(x))), k = the momentum copy of backbone + projector (no gradient).
MLP blocks are Linear (no bias), BN, ReLU; the projector's last Linear is followed by
BN(affine=False), the predictor's has no bias either. ResNet: a 2-layer projector (the official
code; the paper says 3: pass --proj-layers 3) and a predictor without the final BN. ViT: a
3-layer projector, a predictor with the final BN, and the patch projection frozen at its random
init (the paper's stability trick).
``proj_layers`` 0 picks by backbone.

Momentum, per iteration: m = 1 - (1 + cos(pi t / T)) / 2 * (1 - m0) (fastcl.cosine_schedule from m0
to 1), applied in ``after_step`` with the next step's value, i.e. just before that step's keys, as
the official code does at the start of each step.

Official settings: ResNet: LARS, lr 0.6 * B / 256, wd 1e-6, tau 1.0. ViT: AdamW,
lr 1.5e-4 * B / 256, wd 0.1, tau 0.2, e.g.
    fastcl train mocov3 --backbone vit_small --optimizer adamw --lr 1.5e-4 --weight-decay 0.1 \\
        --temperature 0.2
The defaults below are scaled to the small images and short runs of the embedded digits: AdamW
(the ViT recipe's optimizer, for both backbones), tau 0.2, a half-width ResNet-18, 12 epochs.
"""
from __future__ import annotations

import torch
from torch import Tensor

import fastcl
from fastcl import _checks
from fastcl.augment import Recipe
from fastcl.losses import InfoNCELoss
from fastcl.methods.base import Method, byol_views, min_scale_hparam, momentum_copy, momentum_follow
from fastcl.models import ViT, mlp


class MoCoV3(Method):
    """MoCo v3: each view's prediction against the other view's momentum keys."""

    name = "mocov3"
    ring = True
    HPARAMS = {
        "temperature": (0.2, "InfoNCE temperature (official: 1.0 ResNet, 0.2 ViT)"),
        "proj_hidden": (512, "projector and predictor hidden width (4096 on ImageNet)"),
        "proj_dim": (128, "projection dimension (256 on ImageNet)"),
        "proj_layers": (0, "projector layers: 2 (official ResNet code), 3 (paper, ViT); "
                           "0: by backbone"),
        "momentum": (0.99, "base momentum m0 of the cosine schedule to 1"),
        "freeze_patch_projection": (1, "ViT: 1 keeps the patch projection at its random init"),
        "min_scale": min_scale_hparam(0.08),
    }
    DEFAULTS = {**Method.DEFAULTS, "epochs": 12}

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        if hp["proj_layers"] not in (0, 2, 3):
            raise ValueError(f"proj_layers must be 0 (by backbone), 2 or 3, got "
                             f"{hp['proj_layers']!r}")
        _checks.unit_interval("momentum", hp["momentum"])
        vit = isinstance(backbone, ViT)
        layers = hp["proj_layers"] or (3 if vit else 2)
        hidden, dim = hp["proj_hidden"], hp["proj_dim"]
        self.projector = mlp([backbone.out_dim] + [hidden] * (layers - 1) + [dim],
                             last_batch_norm=True, last_affine=False)
        self.predictor = mlp([dim, hidden, dim], last_batch_norm=vit, last_affine=False,
                             last_bias=False)
        if vit and hp["freeze_patch_projection"]:
            backbone.embed.requires_grad_(False)
        self.momentum_encoder = momentum_copy(backbone, self.projector)
        self.criterion = InfoNCELoss(hp["temperature"], gather=self.gather)

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return byol_views(image_size, self.crop_range((self.hparams["min_scale"], 1.0)))

    def contrastive(self, q: Tensor, k: Tensor) -> Tensor:
        """ctr(q, k) = InfoNCE(q, k) * 2 tau (the official scaling)."""
        return self.criterion(q, k) * (2 * self.hparams["temperature"])

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        q1, q2 = (self.predictor(self.projector(self.backbone(v))) for v in views)
        with torch.no_grad():
            k1, k2 = (self.momentum_encoder(v) for v in views)
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)

    def after_step(self, step: int, total_steps: int) -> None:
        m = fastcl.cosine_schedule(min(step + 1, total_steps), total_steps,
                                   self.hparams["momentum"], 1.0)
        momentum_follow(self.momentum_encoder, self.backbone, self.projector, momentum=m)
