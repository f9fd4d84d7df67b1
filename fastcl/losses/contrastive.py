"""Contrastive losses: NT-Xent (SimCLR, InvaSpread), InfoNCE (MoCo, CLIP, CMC, CPC) and supervised
contrastive (SupCon), as functions and as drop-in ``nn.Module``s.

Each is ``log-sum-exp of an anchor's similarities - its mean positive similarity``, computed whole
(positives included) by the fused ops of fastcl.ops.contrastive, which never materialize the
similarity matrix and keep the positives apart from the negatives so that small late-training
losses and their gradients stay exact. Inputs may be float32, bfloat16 or float16 (fp32
accumulation, fp32 loss, gradients rounded to the input dtype once) or float64 (computed by the
reference in float64, for testing).

gather (under torch.distributed, W ranks): False uses this rank's rows alone; True all-gathers
every rank's keys (W x N rows per rank, gradients all-reduced back); "ring" gives the same loss
and gradients with only this rank's rows in memory, the key blocks sent around the ring
(fastcl.ring). Either way a rank's loss is that of its own anchors against every rank's keys.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import _checks
from fastcl._backend import accumulation_dtype
from fastcl.distributed import all_gather_no_grad, all_gather_with_grad, world
from fastcl.ops.contrastive import bank_lse, cross_contrastive, exact_softplus, gram_contrastive
from fastcl.ring import ring_contrastive

Temperature = Union[float, Tensor]
Gather = Union[bool, str]  # False, True or "ring"


def _embed(x: Tensor, normalize: bool) -> Tensor:
    """Rows L2-normalized in fp32, or raw. On CPU the normalized rows stay fp32: the C++ kernels
    compute in fp32, and rounding the unit rows back to 16 bits would move each logit by ~2^-9 / T
    (1.5e-2 relative on bf16 near-duplicate NT-Xent losses of 3e-2, against 6e-6 unrounded).
    Elsewhere they are stored back in the input dtype: the Triton kernels' tensor-core operands."""
    if not normalize:
        return x
    u = F.normalize(x.to(accumulation_dtype(x)), dim=1)
    return u if x.device.type == "cpu" else u.to(x.dtype)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """(N, D), (N, D) -> (N,) row-wise dot products, accumulated in fp32 (or fp64)."""
    acc = accumulation_dtype(a)
    return (a.to(acc) * b.to(acc)).sum(dim=1)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = 0.5,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    gather: Gather = False,
) -> Tensor:
    """NT-Xent (SimCLR / InvaSpread softmax form) over 2N anchors.

    z1, z2: (N, D), two views of N samples. Each anchor's positive is its other view; the other
    2N - 2 embeddings (2WN - 2 with gather=True or "ring" on W ranks) are its negatives.
    Returns the mean (or sum) over the anchors, or with reduction="none" the (2N,) per-anchor
    losses ordered [view 1 anchors, view 2 anchors]. Equals lightly's and
    pytorch-metric-learning's NTXentLoss.
    """
    _checks.paired_embeddings(z1=z1, z2=z2)
    _checks.reduction(reduction)
    _checks.gather(gather)
    rank, size = world() if gather else (0, 1)
    if z1.shape[0] * size < 2:
        raise ValueError(f"z1 and z2 need N >= 2 samples so that each anchor has a negative, "
                         f"got N = {z1.shape[0]}")
    scale = _checks.inverse_temperature(temperature, z1)

    u = torch.cat([_embed(z1, normalize), _embed(z2, normalize)])
    n = z1.shape[0]
    sample = torch.arange(n, device=u.device).repeat(2)  # an anchor's label: its sample
    if size > 1 and gather == "ring":
        own = sample + rank * n
        losses = ring_contrastive(u, u, own, own, scale, self_pairs=True, with_col=False)[0]
    elif size > 1:
        every_sample = (torch.arange(size, device=u.device)[:, None] * n + sample).flatten()
        losses = cross_contrastive(u, all_gather_with_grad(u), sample + rank * n, every_sample,
                                   scale, rank * 2 * n, False)[0]
    else:
        losses = gram_contrastive(u, sample, scale)[0]
    return _reduce(losses, reduction)


def info_nce(
    query: Tensor,
    key: Tensor,
    negatives: Optional[Tensor] = None,
    temperature: Temperature = 0.07,
    *,
    symmetric: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    gather: Gather = False,
) -> Tensor:
    """InfoNCE: query (N, D), key (N, D), row i of key is query i's positive.

    negatives=None: every other key is a negative (MoCo v3, CLIP; all ranks' keys with gather).
    negatives (K, D): MoCo's queue, read in place, no gradient; logits are [q_i.k_i, q_i.negatives]
    (negatives are used as given: a queue of normalized keys, as MoCo keeps it).
    symmetric=True: the mean of the query->key and key->query losses (CLIP, CMC).
    normalize=False uses raw dot products (CPC). reduction="none" gives (N,) losses.
    """
    _checks.paired_embeddings(query=query, key=key)
    _checks.reduction(reduction)
    _checks.gather(gather)
    scale = _checks.inverse_temperature(temperature, query)
    q, k = _embed(query, normalize), _embed(key, normalize)

    if negatives is not None:
        _checks.embeddings("negatives", negatives)
        _checks.same_device(query=query, negatives=negatives)
        if negatives.shape[1] != query.shape[1]:
            raise ValueError(f"negatives must have shape (K, D) with D = {query.shape[1]} as "
                             f"query, got {tuple(negatives.shape)}")
        if symmetric:
            raise ValueError("symmetric=True needs in-batch negatives: pass negatives=None")
        if gather:
            raise ValueError(f"gather={gather!r} gathers in-batch negatives; with a negatives "
                             "queue, enqueue the gathered keys instead and pass gather=False")
        # Cast the small query, never the (large) queue, when their dtypes differ.
        lse = bank_lse(q.to(negatives.dtype), negatives.detach(), scale)[0]
        # log(exp(positive) + exp(lse)) - positive, without the cancellation of the two ~1/T terms.
        return _reduce(exact_softplus(lse - _row_dot(q, k) * scale), reduction)

    rank, size = world() if gather else (0, 1)
    if query.shape[0] * size < 2:
        raise ValueError(f"query and key need N >= 2 rows for in-batch negatives, got "
                         f"N = {query.shape[0]}; pass negatives=... for a queue")
    n = query.shape[0]
    sample = torch.arange(n, device=q.device)  # row i of key is query i's positive
    if size > 1 and gather == "ring":
        own = sample + rank * n
        losses, key_losses = ring_contrastive(q, k, own, own, scale, self_pairs=False,
                                              with_col=symmetric)[:2]
        if symmetric:
            losses = 0.5 * (losses + key_losses)
    elif size > 1:
        own, every_sample = sample + rank * n, torch.arange(size * n, device=q.device)
        losses = cross_contrastive(q, all_gather_with_grad(k), own, every_sample, scale, None,
                                   False)[0]
        if symmetric:
            key_losses = cross_contrastive(k, all_gather_with_grad(q), own, every_sample, scale,
                                           None, False)[0]
            losses = 0.5 * (losses + key_losses)
    else:
        losses, key_losses = cross_contrastive(q, k, sample, sample, scale, None, symmetric)[:2]
        if symmetric:
            losses = 0.5 * (losses + key_losses)
    return _reduce(losses, reduction)


def supcon(
    features: Tensor,
    labels: Optional[Tensor],
    temperature: Temperature = 0.1,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    gather: Gather = False,
    base_temperature: Optional[float] = None,
) -> Tensor:
    """Supervised contrastive loss (L_out of Khosla et al.).

    features: (M, D) with labels (M,), as pytorch-metric-learning; or (N, V, D) with labels (N,)
    (or None: each sample is its own class, i.e. SimCLR over V views), as the SupContrast code,
    whose anchors are ordered view-major. Positives of an anchor are all other rows with its label;
    the denominator runs over all other rows. base_temperature multiplies the loss by
    temperature / base_temperature, as the SupContrast code does (it uses 0.07).

    Every anchor with a positive has SupContrast's loss (and pytorch-metric-learning's); the
    references part at three edges, and fastcl follows:
    * an anchor without a positive (a class of one row, e.g. single-view one-member classes):
      left out of the mean, its loss 0 with reduction="none", as pytorch-metric-learning
      (SupContrast counts it as a 0 in its mean);
    * a batch without any negative (one class): SupContrast's value, the log-sum-exp over the
      positives minus their mean (>= log of their count; pytorch-metric-learning returns 0);
    * an anchor whose loss is 0 in floating point stays in the mean, as SupContrast
      (pytorch-metric-learning's reducer averages over non-zero losses only).
    """
    is_multiview = isinstance(features, Tensor) and features.dim() == 3
    _checks.embeddings("features", features, ndim=3 if is_multiview else 2)
    if is_multiview:
        n, views, d = features.shape
        if labels is None:
            labels = torch.arange(n, device=features.device)
        _check_labels(labels, n, features)
        features = features.transpose(0, 1).reshape(views * n, d)  # view-major, as SupContrast
        labels = labels.repeat(views)
    else:
        if labels is None:
            raise ValueError("labels must be given for features of shape (M, D); pass features "
                             "of shape (N, V, D) to use each sample as its own class")
        _check_labels(labels, features.shape[0], features)
    _checks.reduction(reduction)
    _checks.gather(gather)
    scale = _checks.inverse_temperature(temperature, features)

    u = _embed(features, normalize)
    rank, size = world() if gather else (0, 1)
    if u.shape[0] * size < 2:
        raise ValueError(f"features need at least 2 rows, got {u.shape[0]}")
    labels = labels.long()  # the ops' label dtype
    if size > 1 and gather == "ring":
        losses, _, stats, _ = ring_contrastive(u, u, labels, labels, scale, self_pairs=True,
                                               with_col=False)
    elif size > 1:
        losses, _, stats, _ = cross_contrastive(u, all_gather_with_grad(u), labels,
                                                all_gather_no_grad(labels), scale,
                                                rank * u.shape[0], False)
    else:
        losses, stats = gram_contrastive(u, labels, scale)
    has_positive = stats[3] > 0
    losses = torch.where(has_positive, losses, 0.0)
    if base_temperature is not None:
        _checks.positive_scalar("base_temperature", base_temperature)
        losses = losses * (1.0 / scale) / base_temperature
    if reduction == "mean":
        return losses.sum() / has_positive.sum().clamp(min=1)
    return _reduce(losses, reduction)


def _check_labels(labels, rows: int, features: Tensor) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},) to match features, got "
                         f"{tuple(labels.shape)}")
    _checks.same_device(features=features, labels=labels)


class PairLoss(nn.Module):
    """The options every contrastive loss module here holds and checks at construction:
    temperature (float or 0-dim tensor), normalize, reduction and gather. Subclasses take them as
    ``(temperature=<their default>, *, <their own options>, **options)``."""

    def __init__(self, temperature: Temperature, *, normalize: bool = True,
                 reduction: str = "mean", gather: Gather = False):
        super().__init__()
        _checks.positive_scalar("temperature", temperature)
        self.temperature, self.normalize = temperature, normalize
        self.reduction, self.gather = _checks.reduction(reduction), _checks.gather(gather)


class NTXentLoss(PairLoss):
    """Module form of :func:`nt_xent`: ``loss = NTXentLoss(0.5)(z1, z2)``."""

    def __init__(self, temperature: Temperature = 0.5, **options):
        super().__init__(temperature, **options)  # normalize, reduction, gather

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, self.temperature, normalize=self.normalize,
                       reduction=self.reduction, gather=self.gather)


class InfoNCELoss(PairLoss):
    """Module form of :func:`info_nce`: ``loss = InfoNCELoss(0.07)(query, key, queue)``."""

    def __init__(self, temperature: Temperature = 0.07, *, symmetric: bool = False, **options):
        super().__init__(temperature, **options)  # normalize, reduction, gather
        self.symmetric = symmetric

    def forward(self, query: Tensor, key: Tensor, negatives: Optional[Tensor] = None) -> Tensor:
        return info_nce(query, key, negatives, self.temperature, symmetric=self.symmetric,
                        normalize=self.normalize, reduction=self.reduction, gather=self.gather)


class SupConLoss(PairLoss):
    """Module form of :func:`supcon`: ``loss = SupConLoss(0.1)(features, labels)``."""

    def __init__(self, temperature: Temperature = 0.1, *,
                 base_temperature: Optional[float] = None, **options):
        super().__init__(temperature, **options)  # normalize, reduction, gather
        self.base_temperature = base_temperature

    def forward(self, features: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return supcon(features, labels, self.temperature, normalize=self.normalize,
                      reduction=self.reduction, gather=self.gather,
                      base_temperature=self.base_temperature)
