"""SimCLR v1 (Chen et al. 2020): NT-Xent between two views' projections, through fastcl.nt_xent.

z = n(g(f(x))) with g: d -> hidden (BN, ReLU) -> out_dim (BN). The loss is the paper's mean over
the 2N anchors (the official code sums the two directions, i.e. twice this value).
"""
from __future__ import annotations

from torch import Tensor

from fastcl.augment import Recipe
from fastcl.losses import NTXentLoss
from fastcl.methods.base import Method
from fastcl.models import mlp


class SimCLR(Method):
    name = "simclr"
    HPARAMS = {
        "temperature": (0.5, "NT-Xent temperature (0.5 as SimCLR's CIFAR setting)"),
        "proj_hidden": (512, "projector hidden width"),
        "proj_dim": (128, "projection (loss) dimension"),
        "min_scale": (0.08, "smallest random-resized-crop area fraction"),
    }
    DEFAULTS = dict(optimizer="lars", lr=1.0, weight_decay=1e-6, batch_size=256, epochs=30,
                    warmup_epochs=3)

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        self.projector = mlp([backbone.out_dim, hp["proj_hidden"], hp["proj_dim"]],
                             last_batch_norm=True)
        self.criterion = NTXentLoss(temperature=hp["temperature"], gather=self.gather)

    def view_recipes(self, image_size: int) -> list[Recipe]:
        recipe = Recipe(image_size, scale=(self.hparams["min_scale"], 1.0),
                        jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5)
        return [recipe, recipe]

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        return self.criterion(z1, z2)
