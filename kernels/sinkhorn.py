"""Triton kernels of the Sinkhorn-Knopp op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

The three passes of fastcl/ops/sinkhorn.py for scores (B, K), with a_bk = scores_bk - col_max_k:

* ``sinkhorn_init_fwd``: col_max_k = max_b scores_bk and col_lse_k = log sum_b exp(a_bk *
  inv_eps). ``_sinkhorn_init_fwd_kernel`` runs on (row split, column block) tiles, each keeping
  an online (max, sum) per column over its rows; the splits' partial (max, sum) are merged in
  torch.
* ``sinkhorn_step_fwd``: col_sum_k = sum_b P_bk with P_b = softmax_k(z_b * inv_eps), z_bk =
  (a_bk - max_k' a_bk') + potential_k.
* ``sinkhorn_codes_fwd``: P.
  Both run ``_sinkhorn_rows_fwd_kernel``: a program owns BLOCK_B whole rows at a time; a first
  sweep over the columns takes each row's max of a, a second one keeps an online (max, sum) of
  exp(z * inv_eps) per row, and a third computes P and stores it (CODES), or adds its column sums
  to the program's own row of a (programs, K) buffer of partial sums, summed in torch (no
  atomics, so the result is deterministic). The later sweeps re-read rows the first one just
  read, from L1/L2, so each pass reads the scores once from HBM (at B = 4096, K = 3000 fp32 the
  matrix is 49 MB, about an H100's L2, so later passes may mostly hit L2).

Any magnitude and epsilon is exact: maxima and differences are taken in score units before the
scaling by inv_eps, so nothing overflows and exact ties stay exact (fastcl/ops/sinkhorn.py says
why that matters); a NaN or +inf score makes every code NaN, as in SwAV's code. Offsets are
64-bit. Block sizes and program counts are keyword arguments so that tests can make them small.
Nothing here queries the GPU at import time.

Work and floor (B x K scores, 3 iterations): one init pass, three step passes and the codes pass,
each of 2-3 sweeps over the scores: ~15 reads of B x K elements, no FLOPs to speak of but one
exp per element per pass. At SwAV's 4096 x 3000 fp32 the scores (49 MB) fit an H200's 60 MB L2,
so HBM sees them about once (plus 49 MB of codes written): ~23 us at 4.3 TB/s; the L2 sweeps
(~0.7 GB) and the ~25 launches (the torch merges of the partial column sums between passes) cost
more, ~0.1 ms. No host sync: the potentials stay on the device.
"""
import torch
import triton
import triton.language as tl

from fastcl.kernels.tiling import whole_block_splits

# What the launchers choose from, read by them and by fastcl.kernels.aot
# (tests/kernels/test_gpu_compile.py compiles every entry for sm_80 and sm_90): the scores' dtypes;
# block sizes are fixed.
CONFIGS = dict(dtypes=(torch.float32, torch.bfloat16, torch.float16))


@triton.jit
def _load_scores(s_ptr, rows, cols, n_rows, K, stride_b, stride_k):
    """(rows, cols) tile of scores in float32, -inf outside [0, n_rows) x [0, K)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * stride_b + cols[None, :].to(tl.int64) * stride_k
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, s, float("-inf"))


@triton.jit
def _online_lse_update(m, l, x, inv_eps, AXIS: tl.constexpr):
    """Merges the tile x (score units) into running (max m, sum l of exp((x - m) * inv_eps))
    along AXIS -> (m, l)."""
    m_new = tl.maximum(m, tl.max(x, AXIS))
    # Where nothing finite was seen yet the max is -inf: shift by 0, avoiding (-inf) - (-inf).
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift_b = shift[None, :] if AXIS == 0 else shift[:, None]
    return m_new, l * tl.exp((m - shift) * inv_eps) + tl.sum(tl.exp((x - shift_b) * inv_eps), AXIS)


@triton.jit
def _sinkhorn_init_fwd_kernel(
    s_ptr,  # (B, K) scores
    max_ptr,  # (splits, K) float32, out: column max of the scores over the split's rows
    sum_ptr,  # (splits, K) float32, out: column sum of exp((scores - max) * inv_eps) over them
    B, K, stride_b, stride_k,
    inv_eps,
    rows_per_split,  # a multiple of BLOCK_B
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, B)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_K], tl.float32)
    for start in range(first, last, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        s = _load_scores(s_ptr, rows, cols, last, K, stride_b, stride_k)
        m, l = _online_lse_update(m, l, s, inv_eps, 0)
    offs = split.to(tl.int64) * K + cols
    tl.store(max_ptr + offs, m, mask=cols < K)
    tl.store(sum_ptr + offs, l, mask=cols < K)


@triton.jit
def _row_logits(s_ptr, col_max_ptr, potential_ptr, rows, cols, a_max, B, K, stride_b, stride_k):
    """(rows, cols) tile of z = (scores - col_max - a_max) + potential (score units), -inf
    outside the matrix."""
    col_max = tl.load(col_max_ptr + cols, mask=cols < K, other=float("inf"))
    potential = tl.load(potential_ptr + cols, mask=cols < K, other=float("-inf"))
    s = _load_scores(s_ptr, rows, cols, B, K, stride_b, stride_k)
    return ((s - col_max[None, :]) - a_max[:, None]) + potential[None, :]


@triton.jit
def _sinkhorn_rows_fwd_kernel(
    s_ptr,  # (B, K) scores
    col_max_ptr,  # (K,) float32
    potential_ptr,  # (K,) float32
    out_ptr,  # CODES: (B, K) float32 codes; else (programs, K) float32 zero-filled column sums
    B, K, stride_b, stride_k,
    inv_eps,
    CODES: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    for first in range(pid * BLOCK_B, B, tl.num_programs(0) * BLOCK_B):
        rows = first + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        # Sweep 1: each row's max of a = scores - col_max (0 for rows past B, which are all -inf).
        a_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_max = tl.load(col_max_ptr + cols, mask=cols < K, other=float("inf"))
            s = _load_scores(s_ptr, rows, cols, B, K, stride_b, stride_k)
            a_max = tl.maximum(a_max, tl.max(s - col_max[None, :], 1))
        a_max = tl.where(row_ok, a_max, 0.0)
        # Sweep 2: the online (max, sum) of exp(z * inv_eps) of each row.
        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            z = _row_logits(s_ptr, col_max_ptr, potential_ptr, rows, cols, a_max, B, K, stride_b,
                            stride_k)
            m, l = _online_lse_update(m, l, z, inv_eps, 1)
        m = tl.where(row_ok, m, 0.0)
        inv_l = 1.0 / tl.where(row_ok, l, 1.0)
        # Sweep 3: P = exp((z - m) * inv_eps) / l, which is 0 outside the matrix (z = -inf there).
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            z = _row_logits(s_ptr, col_max_ptr, potential_ptr, rows, cols, a_max, B, K, stride_b,
                            stride_k)
            p = tl.exp((z - m[:, None]) * inv_eps) * inv_l[:, None]
            if CODES:
                offs = rows[:, None].to(tl.int64) * K + cols[None, :]
                tl.store(out_ptr + offs, p, mask=row_ok[:, None] & (cols[None, :] < K))
            else:
                acc_ptr = out_ptr + pid.to(tl.int64) * K + cols
                acc = tl.load(acc_ptr, mask=cols < K, other=0.0)
                tl.store(acc_ptr, acc + tl.sum(p, 0), mask=cols < K)


def sinkhorn_init_fwd(scores, inv_eps, *, block_b=32, block_k=128, max_programs=1024):
    """scores (B, K), inv_eps -> (col_max (K,) = max_b scores_bk, col_lse (K,) = log sum_b
    exp((scores_bk - col_max_k) * inv_eps)), float32.

    Rows are split so that about max_programs (split, column block) programs run."""
    b, k = scores.shape
    col_blocks = triton.cdiv(k, block_k)
    splits = max(1, min(triton.cdiv(b, block_b), max_programs // col_blocks))
    splits, rows_per_split = whole_block_splits(b, block_b, splits)
    part_max = torch.empty(splits, k, dtype=torch.float32, device=scores.device)
    part_sum = torch.empty_like(part_max)
    _sinkhorn_init_fwd_kernel[(splits, col_blocks)](
        scores, part_max, part_sum, b, k, scores.stride(0), scores.stride(1), float(inv_eps),
        rows_per_split, BLOCK_B=block_b, BLOCK_K=block_k,
    )
    top = part_max.amax(0)
    return top, (part_sum * torch.exp((part_max - top) * inv_eps)).sum(0).log()


def sinkhorn_step_fwd(scores, inv_eps, col_max, potential, *, block_b=8, block_k=512,
                      max_programs=512):
    """scores (B, K), inv_eps, col_max (K,), potential (K,) -> col_sum (K,) float32 = sum_b P_bk
    (P as in the module docstring)."""
    b, k = scores.shape
    programs = min(triton.cdiv(b, block_b), max_programs)
    partial = torch.zeros(programs, k, dtype=torch.float32, device=scores.device)
    _sinkhorn_rows_fwd_kernel[(programs,)](
        scores, col_max.contiguous(), potential.contiguous(), partial, b, k, scores.stride(0),
        scores.stride(1),
        float(inv_eps), CODES=False, BLOCK_B=block_b, BLOCK_K=block_k,
    )
    return partial.sum(0)


def sinkhorn_codes_fwd(scores, inv_eps, col_max, potential, *, block_b=8, block_k=512):
    """scores (B, K), inv_eps, col_max (K,), potential (K,) -> codes P (B, K) float32."""
    b, k = scores.shape
    codes = torch.empty(b, k, dtype=torch.float32, device=scores.device)
    _sinkhorn_rows_fwd_kernel[(triton.cdiv(b, block_b),)](
        scores, col_max.contiguous(), potential.contiguous(), codes, b, k, scores.stride(0),
        scores.stride(1),
        float(inv_eps), CODES=True, BLOCK_B=block_b, BLOCK_K=block_k,
    )
    return codes
