"""Triplet margin loss with in-batch mining: batch-hard (Hermans et al. 2017) and semi-hard
(FaceNet, Schroff et al. 2015), as a function and a drop-in ``nn.Module``.

For embeddings x (M, D) with labels (M,) and d the pairwise distance (Euclidean, or its square as
FaceNet, on L2-normalized rows unless normalize=False), a triplet (a, p, n) has
label_p = label_a != label_n, p != a, and loss max(0, d(a, p) - d(a, n) + margin).

- ``mining="batch_hard"``: one triplet per anchor, its farthest positive and its nearest negative;
  the loss is the mean over the anchors that have both.
- ``mining="semi_hard"``: one triplet per positive pair (a, p): the nearest negative farther from
  a than p (d(a, n) > d(a, p)), or, when every negative is nearer, the farthest negative (as
  FaceNet's TensorFlow loss); the loss is the mean over the positive pairs.

There is no log-sum-exp here for a fused op to take: the loss reads one pair per triplet, so it is
plain torch on the (M, M) distance matrix (mini-batches of a few hundred rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import _checks
from fastcl._backend import accumulation_dtype
from fastcl.losses.contrastive import _check_labels, _reduce

MININGS = ("batch_hard", "semi_hard")
DISTANCES = ("squared", "euclidean")
# Euclidean distances are sqrt(max(d^2, EPS)): finite gradients where two rows coincide.
EPS = 1e-12


def _check_margin(margin) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"margin must be a float, got {type(margin).__name__}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return float(margin)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def pairwise_distances(x: Tensor, *, distance: str = "squared") -> Tensor:
    """x (M, D) -> (M, M) squared or plain Euclidean distances, in fp32 (fp64 for fp64 input)."""
    acc = accumulation_dtype(x)
    x = x.to(acc)
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0)
    return d2 if distance == "squared" else d2.clamp(min=EPS).sqrt()


def mine_triplets(dist: Tensor, labels: Tensor, mining: str) -> tuple[Tensor, Tensor, Tensor]:
    """dist (M, M), labels (M,) -> (anchor, positive, negative) index tensors, one triplet per
    anchor (batch_hard, anchors with a positive and a negative) or per positive pair (semi_hard,
    pairs whose anchor has a negative). No gradient: the indices select distances."""
    with torch.no_grad():
        m = dist.shape[0]
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(m, dtype=torch.bool, device=dist.device)
        positive, negative = same & ~eye, ~same
        has_negative = negative.any(1)
        inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
        if mining == "batch_hard":
            valid = positive.any(1) & has_negative
            hardest_positive = torch.where(positive, dist, -inf).argmax(1)
            hardest_negative = torch.where(negative, dist, inf).argmin(1)
            anchor = valid.nonzero().squeeze(1)
            return anchor, hardest_positive[anchor], hardest_negative[anchor]
        anchor, pos = (positive & has_negative[:, None]).nonzero().unbind(1)
        d_an = dist[anchor]  # (P, M): each pair's anchor row
        d_ap = dist[anchor, pos][:, None]
        outside = negative[anchor] & (d_an > d_ap)
        nearest_outside = torch.where(outside, d_an, inf).argmin(1)
        farthest = torch.where(negative[anchor], d_an, -inf).argmax(1)
        neg = torch.where(outside.any(1), nearest_outside, farthest)
        return anchor, pos, neg


def triplet_margin(embeddings: Tensor, labels: Tensor, margin: float = 0.2, *,
                   mining: str = "semi_hard", distance: str = "squared", normalize: bool = True,
                   reduction: str = "mean") -> Tensor:
    """Triplet margin loss over the triplets mined in the batch (see the module docstring).

    embeddings (M, D), labels (M,) integer. reduction="none" gives one loss per mined triplet
    (per anchor for batch_hard, per positive pair for semi_hard); "mean" of an empty set is 0.
    Losses are fp32 (fp64 for fp64 embeddings).
    """
    _checks.embeddings("embeddings", embeddings)
    _check_labels(labels, embeddings.shape[0], embeddings)
    margin = _check_margin(margin)
    _check_choice("mining", mining, MININGS)
    _check_choice("distance", distance, DISTANCES)
    _checks.reduction(reduction)
    # Rows normalized in the distances' fp32 (fp64 for fp64): normalized in bf16, or rounded back
    # to bf16, they mine other triplets than float64 does from the same inputs in 20-100% of
    # random batches (fp32: none).
    x = embeddings.to(accumulation_dtype(embeddings))
    x = F.normalize(x, dim=1) if normalize else x
    dist = pairwise_distances(x, distance=distance)
    anchor, pos, neg = mine_triplets(dist, labels, mining)
    losses = torch.relu(dist[anchor, pos] - dist[anchor, neg] + margin)
    if reduction == "mean" and losses.numel() == 0:
        return dist.sum() * 0  # no triplet: zero loss, still connected to the graph
    return _reduce(losses, reduction)


class TripletLoss(nn.Module):
    """Module form of :func:`triplet_margin`: ``loss = TripletLoss(0.2)(embeddings, labels)``."""

    def __init__(self, margin: float = 0.2, *, mining: str = "semi_hard",
                 distance: str = "squared", normalize: bool = True, reduction: str = "mean"):
        super().__init__()
        self.margin = _check_margin(margin)
        self.mining = _check_choice("mining", mining, MININGS)
        self.distance = _check_choice("distance", distance, DISTANCES)
        self.normalize, self.reduction = normalize, _checks.reduction(reduction)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return triplet_margin(embeddings, labels, self.margin, mining=self.mining,
                              distance=self.distance, normalize=self.normalize,
                              reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}"
