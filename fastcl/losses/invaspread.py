"""InvaSpread's loss (Ye et al. 2019, invariant and spreading instance features), as a function and
a drop-in ``nn.Module``.

For 2N L2-normalized features f (view 1 rows, then view 2 rows), p(a) the other view of a, and
s_ak = exp(f_a . sg(f_k) / tau) for k != a, D_a = sum_{k != a} s_ak, P_a = s_{a,p(a)} / D_a:

    L = -(1 / 2N) sum_a [ log P_a + sum_{k not in {a, p(a)}} log(1 - s_ak / D_a) ]

Every row is an anchor, and the gradient flows through the anchor side only (the other rows enter
as constants, sg). log D_a comes from the fused ``fastcl::cross_lse`` op (anchors against the
detached rows, the self pair left out); the spreading term needs each pair's probability, so it is
read from the (2N, 2N) logits (no fused form exists: it is not a log-sum-exp). Under
torch.distributed (gather=True) every rank's rows are keys; as they get no gradient, a plain
all-gather suffices.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fastcl import _checks
from fastcl.distributed import all_gather_no_grad, world
from fastcl.losses.contrastive import PairLoss, Temperature, _embed, _reduce, _row_dot
from fastcl.ops.contrastive import cross_lse


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate for x near 0 and for x very negative."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def invaspread(z1: Tensor, z2: Tensor, temperature: Temperature = 0.1, *,
               normalize: bool = True, reduction: str = "mean", gather: bool = False) -> Tensor:
    """InvaSpread's loss of two views z1, z2 (N, D) (see the module docstring).

    Returns the mean over the 2N anchors (InvaSpread's L), their sum, or with reduction="none"
    the (2N,) per-anchor losses ordered [view 1 anchors, view 2 anchors]. normalize=False uses the
    rows as given. gather=True (under torch.distributed) adds every rank's rows as negatives.
    """
    _checks.paired_embeddings(z1=z1, z2=z2)
    _checks.reduction(reduction)
    rank, size = world() if gather else (0, 1)
    n = z1.shape[0]
    if n * size < 2:
        raise ValueError(f"z1 and z2 need N >= 2 samples so that each anchor has a negative, "
                         f"got N = {n}")
    scale = _checks.inverse_temperature(temperature, z1.device)
    u1, u2 = _embed(z1, normalize), _embed(z2, normalize)
    anchors = torch.cat([u1, u2])
    keys = anchors.detach()
    if size > 1:
        keys = all_gather_no_grad(keys)
    offset = rank * 2 * n  # this rank's rows among the keys
    log_d = cross_lse(anchors, keys, scale, offset, False)[0]
    positive = _row_dot(anchors, torch.cat([u2, u1]).detach()) * scale
    log_p = positive - log_d

    acc = log_d.dtype
    logits = (anchors.to(acc) @ keys.to(acc).T) * scale.to(acc)  # (2N, 2WN)
    rows = torch.arange(2 * n, device=z1.device)
    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[rows, offset + rows] = True
    excluded[rows, offset + (rows + n) % (2 * n)] = True
    spread = _log1mexp(logits - log_d[:, None]).masked_fill(excluded, 0.0).sum(1)
    return _reduce(-(log_p + spread), reduction)


class InvaSpreadLoss(PairLoss):
    """Module form of :func:`invaspread`: ``loss = InvaSpreadLoss(0.1)(z1, z2)``."""

    def __init__(self, temperature: Temperature = 0.1, **options):
        super().__init__(temperature, **options)  # normalize, reduction, gather

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return invaspread(z1, z2, self.temperature, normalize=self.normalize,
                          reduction=self.reduction, gather=self.gather)


def invaspread_ref(z1: Tensor, z2: Tensor, temperature: Temperature = 0.1, *,
                   normalize: bool = True, reduction: str = "mean") -> Tensor:
    """InvaSpread's formula as its code computes it: exp of the dense logits against detached rows,
    self masked, P_a and the log(1 - s_ak / D_a) terms with the positive's removed."""
    x = torch.cat([z1, z2])
    x = torch.nn.functional.normalize(x, dim=1) if normalize else x
    m, n = x.shape[0], z1.shape[0]
    partner = torch.cat([x[n:], x[:n]]).detach()
    pos = torch.exp((x * partner).sum(1) / temperature)
    not_self = 1.0 - torch.eye(m, dtype=x.dtype, device=x.device)
    s = torch.exp(x @ x.detach().T / temperature) * not_self
    d = s.sum(1)
    p = pos / d
    log_one_minus = torch.log(1 - s / d[:, None]).sum(1) - torch.log(1 - p)
    return _reduce(-(torch.log(p) + log_one_minus), reduction)
