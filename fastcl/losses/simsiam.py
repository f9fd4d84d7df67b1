"""SimSiam's loss (Chen and He 2021): symmetrized negative cosine similarity between each view's
prediction and the stopped-gradient projection of the other view.

    L = -(1/2) [ cos(p1, sg(z2)) + cos(p2, sg(z1)) ],   averaged over the batch

O(N * D) per call, so plain torch (no fused op applies); the cosine is computed in fp32 (fp64 for
fp64 inputs), norms clamped at 1e-12 (F.normalize) where the official nn.CosineSimilarity clamps
their product at 1e-8: the same value for any non-degenerate row.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import _checks
from fastcl._backend import accumulation_dtype
from fastcl.losses.contrastive import _reduce, _row_dot


def negative_cosine(p: Tensor, z: Tensor, *, reduction: str = "mean") -> Tensor:
    """-cos(p_i, sg(z_i)) per row of p, z (N, D); only p gets a gradient. reduction="none": (N,)."""
    _checks.paired_embeddings(p=p, z=z)
    _checks.reduction(reduction)
    acc = accumulation_dtype(p)
    cos = _row_dot(F.normalize(p.to(acc), dim=1), F.normalize(z.detach().to(acc), dim=1))
    return _reduce(-cos, reduction)


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """-(1/2) [mean cos(p1, sg(z2)) + mean cos(p2, sg(z1))]: p = predictions, z = projections,
    all (N, D). Returns an fp32 scalar (fp64 for fp64 inputs) in [-1, 1]."""
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))


class SimSiamLoss(nn.Module):
    """Module form of :func:`simsiam_loss`: ``loss = SimSiamLoss()(p1, p2, z1, z2)``."""

    def forward(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return simsiam_loss(p1, p2, z1, z2)
