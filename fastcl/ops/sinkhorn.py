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
In log domain, with a_bk = scores_bk - max_b' scores_b'k (score units, <= 0):

    log u_k = -LSE_b(a_bk / eps)                                   first row step
    iterations - 1 times, a column step and the next row step:
        P_bk = softmax_k(a_bk / eps + log u_k)                     (B, K), rows sum to 1
        log u_k -= log(sum_b P_bk)
    codes = P for the final log u                                  last column step

(the column max is a factor of u_k, and cancels). Each pass reads the scores once and never writes
them; only the codes pass writes a (B, K) matrix. Why this form is finite and exact for any finite
scores, epsilon and iterations: the logits scores / eps reach 1e42 (scores 1e30, eps 1e-12), past
float32 and where float32 rounds away the O(1) updates of log u; a_bk is exact near each column's
max, log u stays O(iterations log(B K)), and the row passes subtract each row's max of a_b before
adding eps log u (score units), so rows whose differences tie exactly are split by the scalings as
in exact arithmetic. sum_b P_bk >= 1/K (the previous row step gave every prototype the same total),
so the sums need no shift and all-reduce as plain sums. SwAV's code overflows instead (at eps =
0.05: fp32 scores of a few units, fp16 scores above 0.55); wherever it stays finite the two agree
to rounding.

Distributed (gather=True): each rank passes its own rows; the K-vectors are all-reduced between the
passes (the column max and a sum for the first pass, then one sum per further iteration: 4
all-reduces for 3 iterations, like SwAV's code), and each rank gets the codes of its own rows.

Backends, by device through PyTorch's dispatcher (``register_backends``): the op's body runs
``sinkhorn_log_ref`` (any device, and float64), its CPU kernel the C++ kernels of
csrc/sinkhorn.cpp (``_sinkhorn_cpu``), its CUDA kernel the Triton kernels of kernels/sinkhorn.py
(``_sinkhorn_fused``).
The three kernel launchers have the same names and contract on both backends:

    sinkhorn_init_fwd(scores, inv_eps)
        -> (col_max (K,) = max_b scores_bk, col_lse (K,) = log sum_b exp(a_bk * inv_eps))
    sinkhorn_step_fwd(scores, inv_eps, col_max, potential)   -> sum_b P_bk             (K,)
    sinkhorn_codes_fwd(scores, inv_eps, col_max, potential)  -> P                      (B, K)

where potential (K,) float32 = eps (log u - max log u), the scalings in score units (<= 0; the
shift cancels in the softmax), and the kernels compute P_b = softmax_k(((a_bk - max_k' a_bk') +
potential_k) * inv_eps). The driver keeps log u in float64 (O(K)).

On CPU, where exponentials cost more than memory traffic, the second pass also stores P, and each
further column step reweights the stored P (R_bk = P_bk w_k / (P_b . w), the codes for log u +
log w) instead of recomputing exponentials from the scores (``_sinkhorn_cpu``).
"""
from __future__ import annotations

from numbers import Integral

import torch
import torch.distributed as dist
from torch import Tensor

from fastcl import _checks
from fastcl._backend import accumulation_dtype, register_backends
from fastcl.distributed import world


# ----------------------------------------------------------------------------------------------
# Distributed reductions of the (K,) prototype statistics
# ----------------------------------------------------------------------------------------------
def _distributed(gather: bool) -> bool:
    return gather and world()[1] > 1


def _all_ranks_max(x: Tensor, gather: bool) -> Tensor:
    if _distributed(gather):
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def _all_ranks_col_lse(col_max: Tensor, col_lse: Tensor, inv_eps: float,
                       gather: bool) -> tuple[Tensor, Tensor]:
    """(col_max, col_lse) (K,) of sinkhorn_init_fwd over this rank's samples -> over every
    rank's samples: the column max, and the lse of every rank moved to it."""
    if not _distributed(gather):
        return col_max, col_lse
    top = _all_ranks_max(col_max.clone(), gather)
    total = _all_ranks_sum(torch.exp(col_lse + (col_max - top) * inv_eps), gather)
    return top, total.log()


def _all_ranks_sum(x: Tensor, gather: bool) -> Tensor:
    if _distributed(gather):
        dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------------------------
# Reference: plain PyTorch, materialized. The truth in tests (SwAV's own code, which overflows,
# is fastcl.formulas.sinkhorn).
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_log_ref(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
                     gather: bool = False) -> Tensor:
    """The same algorithm in log domain (see the module docstring): scores (B, K) -> codes (B, K)
    in float32 (float64 for float64 scores), finite for any finite scores. The op's fallback."""
    s = scores.to(accumulation_dtype(scores))
    a = s - _all_ranks_max(s.amax(0), gather)
    log_u = -_all_ranks_sum(torch.exp(a / epsilon).sum(0), gather).log()
    logits = (a - a.amax(1, keepdim=True)) / epsilon  # row max 0: the row softmax cancels it
    for _ in range(iterations - 1):
        col_sum = _all_ranks_sum(torch.softmax(logits + log_u, dim=1).sum(0), gather)
        log_u = log_u - col_sum.log()
        log_u = log_u - log_u.max()  # keeps log u near 0, where float32 resolves its updates
    return torch.softmax(logits + log_u, dim=1)


# ----------------------------------------------------------------------------------------------
# Fused path
# ----------------------------------------------------------------------------------------------
def _sinkhorn_fused(kernels, scores: Tensor, epsilon: float, iterations: int,
                    gather: bool) -> Tensor:
    """SwAV's algorithm in iterations + 1 passes of `kernels` over scores (B, K) -> codes (B, K).
    Everything between the passes is O(K) and stays on the device: no host sync."""
    col_max, log_u = _first_row_step(kernels, scores, epsilon, gather)
    return _sinkhorn_steps(kernels, scores, epsilon, col_max, log_u, iterations - 1, gather)


def _first_row_step(kernels, scores: Tensor, epsilon: float, gather: bool) -> tuple[Tensor, Tensor]:
    """The first pass: (col_max (K,), log_u (K,) float64) for scores (B, K)."""
    inv_eps = 1.0 / epsilon
    col_max, col_lse = _all_ranks_col_lse(*kernels.sinkhorn_init_fwd(scores, inv_eps), inv_eps,
                                          gather)
    return col_max, -col_lse.double()


def _potential(log_u: Tensor, epsilon: float) -> Tensor:
    """log_u (K,) float64 -> the kernels' potential (K,) float32: eps (log u - max log u)."""
    return ((log_u - log_u.max()) * epsilon).float()


def _sinkhorn_steps(kernels, scores: Tensor, epsilon: float, col_max: Tensor, log_u: Tensor,
                    steps: int, gather: bool) -> Tensor:
    """The remaining `steps` column steps from log_u (K,) float64, then the codes (B, K)."""
    inv_eps = 1.0 / epsilon
    for _ in range(steps):
        col_sum = _all_ranks_sum(
            kernels.sinkhorn_step_fwd(scores, inv_eps, col_max, _potential(log_u, epsilon)), gather)
        log_u = log_u - col_sum.double().log()
    return kernels.sinkhorn_codes_fwd(scores, inv_eps, col_max, _potential(log_u, epsilon))


# Largest ratio of column weights for which the stored P is rescaled (_sinkhorn_cpu): entries of P
# below FLT_MIN (2**-126, flushed to 0) then weigh at most 2**-126 * K * 2**60 < 2**-40 of their
# row, far below fp32 rounding. The first reweighting is always far inside: after a column step
# every prototype's column of P sums to between 1 / K and B.
_MAX_WEIGHT_RATIO = 2.0 ** 60


def _sinkhorn_cpu(ext, scores: Tensor, epsilon: float, iterations: int, gather: bool) -> Tensor:
    """The C++ path: two exact passes over the scores, the second storing P (B, K) for log u;
    then each further column step only reweights the stored P, R_bk = P_bk w_k / (P_b . w), which
    are the codes for log u + log w (the row normalization absorbs every per-row factor, and any
    common factor of w), so the later passes are multiply-adds instead of exponentials. log w is
    kept in float64 and w passed as exp(log w - max log w), in (0, 1]. While w spans a range where
    P's stored entries represent R exactly to fp32 (always for scores bounded by a few units /
    epsilon, e.g. normalized embeddings), that is the result; otherwise it goes on with exact passes
    over the scores from log u + log w. Checking w reads a value on the host: free on CPU."""
    col_max, log_u = _first_row_step(ext, scores, epsilon, gather)
    potential = _potential(log_u, epsilon)
    if iterations == 1:
        return ext.sinkhorn_codes_fwd(scores, 1.0 / epsilon, col_max, potential)
    col_sum, codes = ext.sinkhorn_step_codes_fwd(scores, 1.0 / epsilon, col_max, potential)
    log_w, done = -_all_ranks_sum(col_sum, gather).double().log(), 2
    while True:
        w = torch.exp(log_w - log_w.max()).float()
        if not bool(w.min() >= 1.0 / _MAX_WEIGHT_RATIO):  # False for NaN too
            break
        if done == iterations:
            ext.sinkhorn_rescale_(codes, w)
            return codes
        col_sum = _all_ranks_sum(ext.sinkhorn_rescaled_col_sum(codes, w), gather)
        log_w = log_w - col_sum.double().log()
        done += 1
    return _sinkhorn_steps(ext, scores, epsilon, col_max, log_u + log_w, iterations - done, gather)


# ----------------------------------------------------------------------------------------------
# fastcl::sinkhorn
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::sinkhorn", mutates_args=())
def _sinkhorn(scores: Tensor, epsilon: float, iterations: int, gather: bool) -> Tensor:
    """scores (B, K) -> codes (B, K) float32 (float64 for float64 scores). Not differentiable."""
    return sinkhorn_log_ref(scores, epsilon, iterations, gather)


register_backends(_sinkhorn, "sinkhorn", sinkhorn_log_ref, _sinkhorn_fused,
                  cpp_launch=_sinkhorn_cpu)


@_sinkhorn.register_fake
def _(scores, epsilon, iterations, gather):
    return scores.new_empty(scores.shape, dtype=accumulation_dtype(scores))


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
    _checks.positive_scalar("epsilon", epsilon, tensor=False)
    _check_iterations(iterations)
    return _sinkhorn(scores.detach(), float(epsilon), int(iterations), bool(gather))
