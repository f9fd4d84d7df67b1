"""InvaSpread's loss (Ye et al. 2019, invariant and spreading instance features), as a function and
a drop-in ``nn.Module``.

For 2N L2-normalized features f (view 1 rows, then view 2 rows), p(a) the other view of a, and
s_ak = exp(f_a . sg(f_k) / tau) for k != a, D_a = sum_{k != a} s_ak, P_a = s_{a,p(a)} / D_a:

    L = -(1 / 2N) sum_a [ log P_a + sum_{k not in {a, p(a)}} log(1 - s_ak / D_a) ]

Every row is an anchor, and the gradient flows through the anchor side only (the other rows enter
as constants, sg). Under torch.distributed (gather=True) every rank's rows are keys; as they get no
gradient, a plain all-gather suffices.

Computed exactly in every regime, with l_ak = log s_ak and the self pair left out of every sum:

    -log P_a             = softplus(log(D_a - s_{a,p(a)}) - l_{a,p(a)})
    -log(1 - s_ak / D_a) = softplus(l_ak - log(D_a - s_ak))

Each complement D_a - s_ak is a log-sum-exp of the row's other logits, never 1 - s_ak / D_a: that
rounds to 0 or noise when the pair takes all the mass (the positive of near-duplicate views, the
negative of near-duplicate images), hence a wrong loss, -inf, and 0 * inf = NaN gradients. Each
term's gradient also stays as small as the term, instead of a difference of O(1) softmax weights.
No fused log-sum-exp kernel computes leave-one-out sums, so this is plain torch on the (2N, 2N)
logits, in fp32 (fp64 for fp64 input).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl import _checks
from fastcl._backend import accumulation_dtype
from fastcl.distributed import all_gather_no_grad, world
from fastcl.losses.contrastive import PairLoss, Temperature, _reduce
from fastcl.ops.contrastive import exact_softplus


def _logsumexp_but_one(x: Tensor) -> Tensor:
    """x (R, K) -> (R, K): entry k is log sum_{j != k} exp(x_j), joined from the log-sum-exps of
    the entries before and after k, so exp(x_k) is never subtracted from a sum it may dominate."""
    none = x.new_full((x.shape[0], 1), -math.inf)
    before = torch.cat([none, x[:, :-1].logcumsumexp(1)], 1)
    after = torch.cat([x[:, 1:].flip(1).logcumsumexp(1).flip(1), none], 1)
    return torch.logaddexp(before, after)


def invaspread(z1: Tensor, z2: Tensor, temperature: Temperature = 0.1, *,
               normalize: bool = True, reduction: str = "mean", gather: bool = False) -> Tensor:
    """InvaSpread's loss of two views z1, z2 (N, D) (see the module docstring).

    Returns the mean over the 2N anchors (InvaSpread's L), their sum, or with reduction="none"
    the (2N,) per-anchor losses ordered [view 1 anchors, view 2 anchors], in fp32 (fp64 for fp64
    input). normalize=False uses the rows as given. gather=True (under torch.distributed) adds
    every rank's rows as negatives.
    """
    _checks.paired_embeddings(z1=z1, z2=z2)
    _checks.reduction(reduction)
    if _checks.gather(gather) == "ring":
        raise ValueError('gather="ring" is not available for invaspread (its keys get no '
                         'gradient, so gather=True all-gathers them without one): pass True')
    rank, size = world() if gather else (0, 1)
    n = z1.shape[0]
    if n * size < 2:
        raise ValueError(f"z1 and z2 need N >= 2 samples so that each anchor has a negative, "
                         f"got N = {n}")
    scale = _checks.inverse_temperature(temperature, z1)
    # Rows stay in fp32 once normalized: rounded back to bf16 (as the kernels' inputs are), they
    # put the loss of near-duplicate views 2% off its float64 value instead of 1e-5.
    acc = accumulation_dtype(z1)
    anchors = torch.cat([z1, z2]).to(acc)
    anchors = F.normalize(anchors, dim=1) if normalize else anchors
    keys = anchors.detach()
    if size > 1:
        keys = all_gather_no_grad(keys)
    logits = (anchors @ keys.T) * scale  # (2N, 2WN)

    rows = torch.arange(2 * n, device=z1.device)
    partner = rank * 2 * n + (rows + n) % (2 * n)  # the positive's column among the keys
    negative = torch.ones_like(logits, dtype=torch.bool)
    negative[rows, rank * 2 * n + rows] = False
    negative[rows, partner] = False
    # (2N, 2WN - 1): the positive first, then the negatives; the self pair is not in D_a.
    pairs = torch.cat([logits[rows, partner, None], logits[negative].view(2 * n, -1)], 1)
    margin = pairs - _logsumexp_but_one(pairs)  # l_ak - log(D_a - s_ak)
    losses = exact_softplus(torch.cat([-margin[:, :1], margin[:, 1:]], 1)).sum(1)
    return _reduce(losses, reduction)


class InvaSpreadLoss(PairLoss):
    """Module form of :func:`invaspread`: ``loss = InvaSpreadLoss(0.1)(z1, z2)``."""

    def __init__(self, temperature: Temperature = 0.1, **options):
        super().__init__(temperature, **options)  # normalize, reduction, gather

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return invaspread(z1, z2, self.temperature, normalize=self.normalize,
                          reduction=self.reduction, gather=self.gather)
