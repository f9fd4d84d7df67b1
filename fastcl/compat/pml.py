"""pytorch-metric-learning's ``NTXentLoss`` and ``SupConLoss`` (``pytorch_metric_learning.losses``,
version 2.9) with their default distance (CosineSimilarity) and reducers, computed by the
contrastive family's fused op (fastcl::gram_contrastive).

    loss_fn = SupConLoss(temperature=0.1)
    loss = loss_fn(embeddings, labels)                        # (M, D), (M,)

The other constructor options of pytorch-metric-learning's losses (reducer, distance,
embedding_regularizer, embedding_reg_weight, collect_stats) are keywords here as there; any value
but the default raises a ValueError (collect_stats is accepted; no statistics are recorded), as
do the forward arguments indices_tuple (mined pairs), ref_emb and ref_labels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastcl import _checks
from fastcl._backend import accumulation_dtype
from fastcl.losses.contrastive import _embed, _row_dot, supcon
from fastcl.ops.contrastive import (
    exact_softplus, gram_contrastive, gram_contrastive_backward, gram_scale_grad,
    negatives_lse_coefficients)


def _is_default_distance(distance) -> bool:
    """None, or pytorch-metric-learning's CosineSimilarity with its default settings."""
    return distance is None or (type(distance).__name__ == "CosineSimilarity"
                                and getattr(distance, "normalize_embeddings", False)
                                and getattr(distance, "power", None) == 1)


class _PMLLoss(nn.Module):
    """The options of pytorch-metric-learning's BaseMetricLossFunction that fastcl honours: the
    defaults (`default_reducer`: the class name of the loss's default reducer)."""

    default_reducer = ""

    def __init__(self, temperature, *, reducer=None, distance=None, embedding_regularizer=None,
                 embedding_reg_weight=1, collect_stats=None):
        super().__init__()
        _checks.positive_scalar("temperature", temperature)
        if not _is_default_distance(distance):
            raise ValueError(f"distance must be None or CosineSimilarity() (fastcl computes the "
                             f"cosine similarity), got {distance!r}")
        if reducer is not None and type(reducer).__name__ != self.default_reducer:
            raise ValueError(f"reducer must be None or {self.default_reducer}() (the default of "
                             f"{type(self).__name__}), got {reducer!r}")
        if embedding_regularizer is not None:
            raise ValueError(f"embedding_regularizer is not supported (add its term to the loss "
                             f"yourself), got {embedding_regularizer!r}")
        self.temperature, self.embedding_reg_weight = temperature, embedding_reg_weight
        self.collect_stats = collect_stats

    def forward(self, embeddings: Tensor, labels: Optional[Tensor] = None, indices_tuple=None,
                ref_emb=None, ref_labels=None) -> Tensor:
        """embeddings (M, D), labels (M,) -> the loss (fp32 for 16-bit embeddings)."""
        self._check(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if embeddings.shape[0] < 2:
            return self._zero(embeddings)
        return self._loss(embeddings, labels)

    def _check(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> None:
        if indices_tuple is not None:
            raise ValueError("indices_tuple (mined pairs) is not supported: pass labels only")
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb and ref_labels are not supported: pass embeddings and "
                             "labels only")
        if labels is None:
            raise ValueError("labels must be given (M,) for embeddings (M, D)")
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        _checks.embeddings("embeddings", embeddings)
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},) to match "
                             f"embeddings, got {tuple(labels.shape)}")

    @staticmethod
    def _zero(embeddings: Tensor) -> Tensor:
        """pytorch-metric-learning's loss without any pair: 0, with a zero gradient."""
        return embeddings.to(accumulation_dtype(embeddings)).sum() * 0


class NTXentLoss(_PMLLoss):
    """pytorch-metric-learning's NTXentLoss: the mean over positive pairs (a, p) of
    -log(exp(s_ap) / (exp(s_ap) + sum over a's negatives exp(s_an))), s = cosine / temperature,
    for any labels (a label on c embeddings gives c (c - 1) pairs; the other positives of a are in
    no term's denominator).

    Each pair's loss is softplus(lse_neg_a - s_ap), with lse_neg_a the log-sum-exp over a's
    negatives: fastcl::gram_contrastive's statistics (never the M x M matrix), its gradient by
    fastcl::gram_contrastive_backward (`_NegativesLSE`); s_ap is the pair's own dot product
    (saved for backward: 2 x pairs x D values). Exact where pytorch-metric-learning rounds the
    ratio in fp32 (a near-duplicate positive's loss ~1e-7 and below). Reading the labels syncs
    with the device.
    """

    default_reducer = "MeanReducer"

    def __init__(self, temperature: float = 0.07, **kwargs):
        super().__init__(temperature, **kwargs)

    def _loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        anchors, partners = positive_pairs(labels)
        if len(anchors) == 0 or bool((labels == labels[0]).all()):
            return self._zero(embeddings)  # no positive or no negative pair
        u = _embed(embeddings, normalize=True)
        scale = _checks.inverse_temperature(self.temperature, embeddings)
        lse_neg = _NegativesLSE.apply(u, labels.long(), scale)
        acc = lse_neg.dtype
        positive = scale.to(acc) * _row_dot(u[anchors], u[partners])
        return exact_softplus(lse_neg[anchors] - positive).mean()


def positive_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """labels (M,) -> (anchors, partners) (P,): every ordered pair a != p of equal labels, built
    from the sorted labels in O(P) memory (no M x M mask)."""
    sorted_labels, order = labels.sort(stable=True)
    counts = torch.unique_consecutive(sorted_labels, return_counts=True)[1]
    group_start = (counts.cumsum(0) - counts).repeat_interleave(counts)  # per sorted position
    n_partners = counts.repeat_interleave(counts) - 1
    anchor = torch.arange(len(labels), device=labels.device).repeat_interleave(n_partners)
    first = (n_partners.cumsum(0) - n_partners).repeat_interleave(n_partners)
    partner = group_start[anchor] + torch.arange(len(anchor), device=labels.device) - first
    partner = partner + (partner >= anchor)  # skip the anchor itself
    return order[anchor], order[partner]


class _NegativesLSE(torch.autograd.Function):
    """u (M, D) unit rows, labels (M,) int64, scale () -> lse_neg (M,): log sum over the rows of
    another label of exp(scale <u_a, u_n>) (fp32; -inf without negatives). Backward runs
    fastcl::gram_contrastive_backward with coefficients that weight the positives by 0
    (negatives_lse_coefficients)."""

    @staticmethod
    def forward(ctx, u, labels, scale):
        stats = gram_contrastive(u, labels, scale)[1]
        ctx.save_for_backward(u, labels, scale, stats)
        return stats[0]

    @staticmethod
    def backward(ctx, grad):
        u, labels, scale, stats = ctx.saved_tensors
        du = gram_contrastive_backward(u, labels, scale, negatives_lse_coefficients(stats, grad))
        dscale = gram_scale_grad(du, u, scale) if ctx.needs_input_grad[2] else None
        return du.to(u.dtype), None, dscale


class SupConLoss(_PMLLoss):
    """pytorch-metric-learning's SupConLoss: per anchor, -mean over its positives p of
    log(exp(s_ap) / sum over every other embedding exp(s_an)), s = cosine / temperature; averaged
    over the anchors whose loss is > 0 (AvgNonZeroReducer). 0 for a batch without a positive or
    without a negative pair.
    """

    default_reducer = "AvgNonZeroReducer"

    def __init__(self, temperature: float = 0.1, **kwargs):
        super().__init__(temperature, **kwargs)

    def _loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        losses = supcon(embeddings, labels, self.temperature, reduction="none")
        has_negative = (labels != labels[0]).any()
        kept = (losses > 0) & has_negative
        return torch.where(kept, losses, 0.0).sum() / kept.sum().clamp(min=1)
