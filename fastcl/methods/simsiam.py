"""SimSiam (Chen and He 2021): one shared encoder, a predictor and a stop-gradient; no negatives,
no momentum encoder. Loss from fastcl.losses.simsiam:

    L = -(1/2) [ cos(p1, sg(z2)) + cos(p2, sg(z1)) ],  z = projector(backbone(x)), p = predictor(z)

Projector: 3 layers d -> h -> h -> h, every Linear followed by BN (the last one affine=False and
bias-free, as the official code's frozen fc bias); ReLU between. Predictor: h -> h / 4 (BN, ReLU)
-> h, a bottleneck. ``fixed_predictor_lr`` = 1 keeps the predictor's learning rate at the peak lr
while the rest follows the schedule (the official --fix-pred-lr, which its results use): the
predictor's parameters carry ``fixed_lr = True`` and the optimizer keeps them in their own groups.

Official: SGD, lr 0.05 * B / 256, wd 1e-4, momentum 0.9, no warm-up, B 512, h = 2048.
"""
from __future__ import annotations

from torch import Tensor

from fastcl.augment import Recipe
from fastcl.losses.simsiam import SimSiamLoss
from fastcl.methods.base import MOCO_V2_COLOR, Method, min_scale_hparam
from fastcl.models import mlp


class SimSiam(Method):
    """SimSiam: a predictor and a stop-gradient; no negatives, no momentum."""

    name = "simsiam"
    HPARAMS = {
        "proj_dim": (512, "projector width and output dimension h (2048 on ImageNet)"),
        "pred_hidden": (128, "predictor bottleneck width (h / 4)"),
        "fixed_predictor_lr": (1, "1: the predictor keeps the peak lr (no schedule); 0: scheduled"),
        "min_scale": min_scale_hparam(0.2),
    }
    # SGD without warm-up, as the paper's.
    DEFAULTS = {**Method.DEFAULTS, "optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4,
                "epochs": 60, "warmup_epochs": 0}

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        self.check_choice("fixed_predictor_lr", (0, 1))
        dim = hp["proj_dim"]
        self.projector = mlp([backbone.out_dim, dim, dim, dim], last_batch_norm=True,
                             last_affine=False)
        self.predictor = mlp([dim, hp["pred_hidden"], dim])
        if hp["fixed_predictor_lr"]:
            for p in self.predictor.parameters():
                p.fixed_lr = True
        self.criterion = SimSiamLoss()

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return self.same_views(image_size, **MOCO_V2_COLOR)  # SimSiam's is MoCo v2's

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        return self.criterion(self.predictor(z1), self.predictor(z2), z1, z2)
