"""Triplet-loss metric learning with in-batch mining (fastcl.losses.triplet): batch-hard (Hermans et
al. 2017) or semi-hard (FaceNet, Schroff et al. 2015).

e = n(fc(f(x))) (fc: d -> embed_dim) for two augmented views of each image; the 2B embeddings and
their labels form the batch in which triplets (a, p, n) are mined, each costing
max(0, d(a, p) - d(a, n) + margin):

- mining="semi_hard" (FaceNet; the default, with squared L2 distances and margin 0.2): per positive
  pair, the nearest negative farther than the positive (the farthest negative when none is);
- mining="batch_hard": per anchor, its farthest positive and nearest negative (use
  --distance euclidean for Hermans et al.'s setting).

A supervised trainer: the trainer passes the labels. FaceNet and batch-hard draw P classes x K
images per batch; here batches are uniform draws, which at the default batch size hold every
class of a small label set many times (and each image's two views are positives of each other).
Without labels each image is its own class.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastcl.augment import Recipe
from fastcl.losses.triplet import TripletLoss
from fastcl.methods.base import SUPCON_COLOR, Method, min_scale_hparam


class Triplet(Method):
    """Triplet: margin loss over batch-hard or semi-hard triplets of two views with labels."""

    name = "triplet"
    batch_extras = ("labels",)
    HPARAMS = {
        "margin": (0.2, "triplet margin"),
        "mining": ("semi_hard", "semi_hard (FaceNet) or batch_hard (Hermans et al.)"),
        "distance": ("squared", "squared (FaceNet) or euclidean L2 distance, on unit embeddings"),
        "embed_dim": (128, "embedding dimension"),
        "min_scale": min_scale_hparam(0.2),
    }
    DEFAULTS = {**Method.DEFAULTS, "epochs": 8}

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        self.head = nn.Linear(backbone.out_dim, hp["embed_dim"])
        self.criterion = TripletLoss(hp["margin"], mining=hp["mining"], distance=hp["distance"])

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return self.same_views(image_size, **SUPCON_COLOR)  # SupCon's augmentation

    def forward(self, views: list[Tensor], *, epoch: int = 0,
                labels: Optional[Tensor] = None) -> Tensor:
        batch = views[0].shape[0]
        if labels is None:
            labels = torch.arange(batch, device=views[0].device)
        embeddings = torch.cat([self.head(self.backbone(v)) for v in views])
        return self.criterion(embeddings, labels.repeat(len(views)))
