"""Sinkhorn-Knopp op family: SwAV's code assignment (``distributed_sinkhorn``), fused and stable.

SwAV's algorithm, for scores (B, K) of B samples against K prototypes, with B counting the samples
of every rank:

    Q = exp(scores / eps)^T                                       (K, B)
    Q /= sum(Q)                                                   (all-reduced)
    iterations times:  Q /= row sums, over samples (all-reduced);  Q /= K
                       Q /= column sums, over prototypes;          Q /= B
    codes = (B * Q)^T                                             (B, K), rows sum to 1

Every step rescales the rows or the columns of E = exp(scores / eps)^T, so Q = diag(u) E diag(v)
and only the scalings change; constant factors (the total, 1/K, 1/B) cancel out of the codes.
With x_bk = scores_bk / eps, in log domain:

    log u_k = -LSE_b(x_bk)                                         first row step
    iterations - 1 times, a column step and the next row step:
        P_bk = softmax_k(x_bk + log u_k)                           (B, K), rows sum to 1
        log u_k -= log(sum_b P_bk)
    codes = P for the final log u                                  last column step

Each pass reads the scores once and never writes them; only the codes pass writes a (B, K) matrix.
Every exp is shifted by a maximum (per prototype in the first pass, per sample after), so no
magnitude or dtype overflows, and nothing underflows that matters: sum_b P_bk >= 1/K (the previous
row step gave every prototype the same total), so the sums need no shift and all-reduce as plain
sums. SwAV's code overflows instead (at eps = 0.05: fp32 scores of a few units, fp16 scores above
0.55); wherever it stays finite the two agree to rounding.

Distributed (gather=True): each rank passes its own rows; the K-vectors are all-reduced between the
passes (a max and a sum for the first pass's lse, then one sum per further iteration: 4
all-reduces for 3 iterations, like SwAV's code), and each rank gets the codes of its own rows.

Backends, chosen per device: the C++ kernels of csrc/sinkhorn.cpp on CPU, the Triton kernels of
kernels/sinkhorn.py on CUDA, ``sinkhorn_log_ref`` anywhere else and for float64. The three kernel
launchers have the same names and contract on both backends:

    sinkhorn_init_fwd(scores, inv_eps)          -> log sum_b exp(scores_bk * inv_eps)     (K,)
    sinkhorn_step_fwd(scores, inv_eps, log_u)   -> sum_b P_bk                              (K,)
    sinkhorn_codes_fwd(scores, inv_eps, log_u)  -> P                                       (B, K)

On CPU, where exponentials cost more than memory traffic, the second pass also stores P, and each
further column step reweights the stored P (R_bk = P_bk w_k / (P_b . w), the codes for log u +
log w) instead of recomputing exponentials from the scores (``_sinkhorn_cpu``).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.distributed as dist
from torch import Tensor

from fastcl import _checks
from fastcl._backend import accumulation_dtype, cpp_extension, kernels_for
from fastcl.distributed import world


# ----------------------------------------------------------------------------------------------
# Distributed reductions of the (K,) prototype statistics
# ----------------------------------------------------------------------------------------------
def _distributed(gather: bool) -> bool:
    return gather and world()[1] > 1


def _all_ranks_lse(lse: Tensor, gather: bool) -> Tensor:
    """lse (K,) over this rank's samples -> over every rank's samples (max, then shifted sum)."""
    if not _distributed(gather):
        return lse
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    total = torch.exp(lse - top)
    dist.all_reduce(total)
    return top + total.log()


def _all_ranks_sum(x: Tensor, gather: bool) -> Tensor:
    if _distributed(gather):
        dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, materialized. The truth in tests.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_ref(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
                 gather: bool = False) -> Tensor:
    """SwAV's ``distributed_sinkhorn``, line for line, in the dtype of scores (B, K) -> (B, K).

    Overflows where SwAV's code does (exp(scores / epsilon) beyond the dtype's range gives
    inf/NaN): the baseline, and the truth in float64 where it stays finite.
    """
    Q = torch.exp(scores / epsilon).t()  # Q is K-by-B for consistency with notations from the paper
    B = Q.shape[1] * (world()[1] if _distributed(gather) else 1)  # number of samples to assign
    K = Q.shape[0]  # how many prototypes

    # make the matrix sum to 1
    sum_Q = _all_ranks_sum(torch.sum(Q), gather)
    Q /= sum_Q

    for _ in range(iterations):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = _all_ranks_sum(torch.sum(Q, dim=1, keepdim=True), gather)
        Q /= sum_of_rows
        Q /= K

        # normalize each column: total weight per sample must be 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B

    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.t()


@torch.no_grad()
def sinkhorn_log_ref(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
                     gather: bool = False) -> Tensor:
    """The same algorithm in log domain (see the module docstring): scores (B, K) -> codes (B, K)
    in float32 (float64 for float64 scores), finite for any finite scores. The op's fallback."""
    x = scores.to(accumulation_dtype(scores)) / epsilon
    log_u = -_all_ranks_lse(torch.logsumexp(x, dim=0), gather)
    for _ in range(iterations - 1):
        log_v = -torch.logsumexp(x + log_u, dim=1, keepdim=True)
        log_u = -_all_ranks_lse(torch.logsumexp(x + log_v, dim=0), gather)
    return torch.softmax(x + log_u, dim=1)


# ----------------------------------------------------------------------------------------------
# Fused path
# ----------------------------------------------------------------------------------------------
def _sinkhorn_fused(kernels, scores: Tensor, epsilon: float, iterations: int,
                    gather: bool) -> Tensor:
    """SwAV's algorithm in iterations + 1 passes of `kernels` over scores (B, K) -> codes (B, K).
    Everything between the passes is O(K) and stays on the device: no host sync."""
    inv_eps = 1.0 / epsilon
    log_u = -_all_ranks_lse(kernels.sinkhorn_init_fwd(scores, inv_eps), gather)
    return _sinkhorn_steps(kernels, scores, inv_eps, log_u, iterations - 1, gather)


def _sinkhorn_steps(kernels, scores: Tensor, inv_eps: float, log_u: Tensor, steps: int,
                    gather: bool) -> Tensor:
    """The remaining `steps` column steps from log_u (K,), then the codes (B, K)."""
    for _ in range(steps):
        col_sum = _all_ranks_sum(kernels.sinkhorn_step_fwd(scores, inv_eps, log_u), gather)
        log_u = log_u - col_sum.log()
    return kernels.sinkhorn_codes_fwd(scores, inv_eps, log_u)


# Largest ratio of column weights for which the stored P is rescaled (_sinkhorn_cpu): entries of P
# below FLT_MIN (2**-126, flushed to 0) then weigh at most 2**-126 * K * 2**60 < 2**-40 of their
# row, far below fp32 rounding. The first reweighting is always far inside: after a column step
# every prototype's column of P sums to between 1 / (B K) and B.
_MAX_WEIGHT_RATIO = 2.0 ** 60


def _sinkhorn_cpu(ext, scores: Tensor, epsilon: float, iterations: int, gather: bool) -> Tensor:
    """The C++ path: two exact passes over the scores, the second storing P (B, K) for log u;
    then each further column step only reweights the stored P, R_bk = P_bk w_k / (P_b . w), which
    are the codes for log u + log w (the row normalization absorbs every per-row factor), so the
    later passes are multiply-adds instead of exponentials. While the weights w span a range where
    P's stored entries represent R exactly to fp32 (always for scores bounded by a few units /
    epsilon, e.g. normalized embeddings), that is the result; otherwise it goes on with exact passes
    over the scores from log u + log w. Checking w reads a value on the host: free on CPU."""
    inv_eps = 1.0 / epsilon
    log_u = -_all_ranks_lse(ext.sinkhorn_init_fwd(scores, inv_eps), gather)
    if iterations == 1:
        return ext.sinkhorn_codes_fwd(scores, inv_eps, log_u)
    col_sum, codes = ext.sinkhorn_step_codes_fwd(scores, inv_eps, log_u)
    w, done = 1.0 / _all_ranks_sum(col_sum, gather), 2
    while bool(w.max() <= w.min() * _MAX_WEIGHT_RATIO):  # False for inf and NaN too
        if done == iterations:
            ext.sinkhorn_rescale_(codes, w)
            return codes
        w = w / _all_ranks_sum(ext.sinkhorn_rescaled_col_sum(codes, w), gather)
        done += 1
    return _sinkhorn_steps(ext, scores, inv_eps, log_u + w.log(), iterations - done, gather)


# ----------------------------------------------------------------------------------------------
# fastcl::sinkhorn
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::sinkhorn", mutates_args=())
def _sinkhorn(scores: Tensor, epsilon: float, iterations: int, gather: bool) -> Tensor:
    """scores (B, K) -> codes (B, K) float32 (float64 for float64 scores). Not differentiable."""
    kernels = kernels_for(scores, "sinkhorn")
    if kernels is None:
        return sinkhorn_log_ref(scores, epsilon, iterations, gather)
    if kernels is cpp_extension():
        return _sinkhorn_cpu(kernels, scores, epsilon, iterations, gather)
    return _sinkhorn_fused(kernels, scores, epsilon, iterations, gather)


@_sinkhorn.register_fake
def _(scores, epsilon, iterations, gather):
    return scores.new_empty(scores.shape, dtype=accumulation_dtype(scores))


def _check_epsilon(epsilon) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, Real):
        raise TypeError(f"epsilon must be a float, got {type(epsilon).__name__}")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")


def _check_iterations(iterations) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, Integral):
        raise TypeError(f"iterations must be an int, got {type(iterations).__name__}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")


def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3, *,
             gather: bool = False) -> Tensor:
    """SwAV's Sinkhorn-Knopp code assignment (``distributed_sinkhorn``), fused and overflow-free.

    scores: (B, K) similarities of B samples to K prototypes (z C^T), float32, bfloat16, float16
    or float64. Returns the codes Q (B, K), float32 (float64 for float64 scores), each row summing
    to 1, after `iterations` alternating normalizations with entropic regularization `epsilon`:
    exactly SwAV's algorithm (see the module docstring), computed in log domain so that it stays
    finite where SwAV's exp(scores / epsilon) overflows (large scores, small epsilon, 16-bit
    inputs). A NaN or +inf score makes every code NaN, as in SwAV's code.

    gather=True (under torch.distributed): each rank passes its own (B, K) rows, and the codes are
    those of the full batch of world_size * B rows (all ranks must pass the same K); only O(K)
    vectors are all-reduced. Without an initialized process group it is the same as False.

    No gradient flows (SwAV runs it under no_grad, on detached scores): the result never requires
    grad.
    """
    _checks.embeddings("scores", scores)
    _check_epsilon(epsilon)
    _check_iterations(iterations)
    return _sinkhorn(scores.detach(), float(epsilon), int(iterations), bool(gather))
