"""Triton kernels of the contrastive op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

Every op of fastcl/ops/contrastive.py is one "pair problem": logits s_ij = scale <a_i, b_j> for
a (M, D), b (N, D), pairs with j - i == offset optionally left out; of the kept pairs, those with
equal labels are positives and the rest negatives (the module docstring there says why their
statistics are kept apart).

* ``_stats_fwd_kernel``: row-stationary; a program owns BLOCK_M rows of a and streams the blocks
  of b (all of them, or one split of them when the rows are few), keeping per row an online
  (max, sum) of the negatives and another of the positives (so any logit magnitude is exact, and
  a single positive's lse is its logit exactly), the sum of the positive logits and their count:
  stats (4, M) = [lse_neg, lse_pos, sum_pos, count]. Column
  stats are the same kernel with a and b swapped (offset negated). Without labels (WITH_POS off)
  every kept pair is a negative, and WITH_MEAN also accumulates sum_j softmax(s_i)_j b_j, all
  that the backward of bank negatives needs (``bank_lse_fwd``).
* ``_gram_unshifted_kernel``: the Gram forward (NT-Xent, SupCon: a = b = u) over the tiles
  J >= I only. With R = |scale| max_i |u_i|^2 bounding every |s_ij| (Cauchy-Schwarz), when
  R <= 40 (unit rows at temperature >= 0.025) every exp(s_ij) and every sum of them is a normal
  fp32 number, so no running max is needed: one exp2 per pair serves row i (the tile's row sums)
  and row j (its column sums, s_ij = s_ji), half the forward's dot products and exponentials.
  The column sums go to other programs' rows through float atomics on (4, M) scalars (BLOCK_N
  per tile, none D-wide). R is computed on the device and both this kernel and the general one
  are launched, each doing nothing unless the device flag selects it: no host sync. A single
  positive's lse is still its logit exactly (taken from the logit sum). Under
  torch.use_deterministic_algorithms, or below TARGET_PROGRAMS / 4 = 128 row blocks (about one
  per SM; fewer rows run the general kernel with split columns), the general kernel alone runs.
* ``_stats_bwd_kernel``: row-stationary too: da_I = scale sum_J W_IJ b_J for the BLOCK_M rows a
  program owns, recomputing each tile of logits from the inputs and the coefficients
  coef (5, .) = [g, lse, lse_pos, 1 / count, r] of the rows (HAS_ROW) and of the columns
  (HAS_COL): W_ij = g_i exp(s_ij - lse_i) for a negative, g_i ((q - 1 / count_i) - q r_i) for a
  positive (q = exp(s_ij - lse_pos_i), exactly 1 for a single positive), 0 for a left-out pair,
  plus the same with the column's coefficients. The key gradient db = scale W^T a is the same
  kernel stationary on the other side (a and b, row and column coefficients swapped, offset
  negated): flash-attention 2's / Inf-CL's dq and dk passes, each program writing its own rows
  once, with no atomics. A Gram matrix (a = b = u) needs one pass: du = scale (W + W^T) u, the
  rows' and the columns' weights of one tile with the same coefficients.

GPU design. Logits are formed in base 2: the scale is multiplied by log2(e) once, the statistics
are kept in log2 units (exp2 / log2 map to single MUFU instructions) and converted with ln(2) when
stored; a single positive still gives lse_pos = sum_pos exactly (both are s2 * ln 2 of the same
s2). bf16 / fp16 operands go into tl.dot as they are, with fp32 accumulation and statistics;
fp32 operands as exact fp32 ("ieee") unless torch.backends.cuda.matmul.allow_tf32 is set, then
as tf32 (up to D = 512). Rows of D features live on chip (BLOCK_D = the first of
``CONFIGS["dims"]`` >= D), so D <= MAX_DIM; wider inputs raise ValueError and the caller falls
back. Tiles, warps and stages: ``triton.autotune`` over the few candidates ``TILES`` lists per
(operand kind, D bucket), timed once per process and key on the first launch; the interpreter
and tests that force tiles run the first candidate. Nothing here queries the GPU at import.

Program order and L2: every kernel is stationary on a block of rows and streams the other side's
blocks in the same order, programs numbered along the rows. The programs resident at once (a few
per SM) therefore read the same column block at about the same time: each block comes from HBM
once per wave and from L2 for the others, which is what the grouped ("super-grouped") order of
a GEMM's 2-D tile grid buys, without a 2-D grid. At 2N = 65536, D = 128 bf16 the whole streamed
side is 16.8 MB, inside an H100's 50 MB / H200's 60 MB L2; at D = 1024 (134 MB) the shared
streaming order is what keeps HBM traffic near one read per wave. In the half-tile Gram kernel
program I streams blocks I.. M: the longest programs start first.

Work per op (M, N rows, D features; an H200 does ~790 TFLOP/s bf16 dense, ~4 T exp/s, 4.3 TB/s):
  forward, one direction      2 M N D FLOP, M N exp2; reads (M + N) D elements from HBM (the
                              streamed b is re-read by every row block from L2), writes 16 B/row
  Gram forward (NT-Xent)      2 M^2 D FLOP, M^2 exp2   (M = 2N)
  Gram backward               4 M^2 D FLOP (recompute S, W u), 2 M^2 exp2 (row and column weights)
  cross backward, dq and dk   4 M N D FLOP per pass, (1 or 2) M N exp2 per pass
  bank forward (lse + mean)   4 M K D FLOP, M K exp2
At 2N = 65536, D = 128, bf16 the NT-Xent forward is 1.10 TFLOP = 1.4 ms of matmul against 4.3 G
exp2 = 1.1 ms: the floor is ~1.4 ms if the two overlap (~2.5 ms if not); forward + backward
3.3 TFLOP, 13 G exp2: 4.2 ms / 3.2 ms. Bytes are negligible (65536 x 128 x 2 B = 16.8 MB in,
read in ~4 us). The half-tile Gram forward halves the forward (0.55 TFLOP, 2.1 G exp2: ~0.7 ms)
where it applies. Few rows against many columns (MoCo: M = 256 queries, a 65536-row queue: 4 row
blocks) would leave the GPU idle, so the forward splits the columns too (grid (row blocks,
splits), about 512 programs) and merges the splits' (lse, mean) or stats in torch,
O(splits x M (x D)).
"""
import os

import torch
import triton
import triton.language as tl

from fastcl.kernels.tiling import TARGET_PROGRAMS, whole_block_splits

MAX_DIM = 1024
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# What the launchers choose from, read by them and by fastcl.kernels.aot
# (tests/kernels/test_gpu_compile.py compiles every entry for sm_80 and sm_90): input dtypes, and
# the padded row widths BLOCK_D (a row of D features is padded to the first bucket >= D; 64 at
# least: below it the exponentials, not the dot products, set the time).
CONFIGS = dict(dtypes=(torch.float32, torch.bfloat16, torch.float16),
               dims=(64, 128, 256, 512, MAX_DIM))
# Candidate tiles (BLOCK_M = BLOCK_N, num_warps, num_stages) per operand kind and BLOCK_D, the
# first the default; on a GPU ``triton.autotune`` times them once per (kernel flags, BLOCK_D,
# precision, dtypes) and keeps the fastest. "ieee" / "tf32": fp32 operands (exact fp32 dots run on
# FMA units, operands in registers); "16": bf16 / fp16 operands on tensor cores, for the forward
# statistics; "16acc": the kernels that also carry a (BLOCK_M, BLOCK_D) fp32 accumulator
# (backward, bank mean). With BLOCK_D = 256, "16" takes 8 warps: with 4, the positives'
# statistics spill. Every candidate compiles without spills for sm_80 and sm_90 (docs/kernels.md).
_FP32_TILES = {64: [(32, 8, 3), (64, 8, 2)], 128: [(16, 8, 3), (32, 8, 2)],
               256: [(16, 8, 2), (32, 8, 2)], 512: [(16, 8, 2)], 1024: [(16, 8, 2)]}
TILES = {
    "ieee": _FP32_TILES,
    # tf32 dots stage their fp32 operands in shared memory: at BLOCK_D = 1024 they take 192 KiB
    # whatever the stages, over an A100's 163 KiB, so rows that wide stay exact fp32.
    "tf32": {d: tiles for d, tiles in _FP32_TILES.items() if d <= 512},
    "16": {64: [(64, 4, 3), (128, 8, 3), (64, 4, 4)], 128: [(64, 4, 3), (128, 8, 3), (64, 8, 4)],
           256: [(64, 8, 2), (128, 8, 2), (64, 8, 3)], 512: [(32, 8, 2), (64, 8, 2)],
           1024: [(32, 8, 2)]},
    "16acc": {64: [(64, 8, 3), (128, 8, 3)], 128: [(64, 8, 3), (128, 8, 2)],
              256: [(32, 8, 2), (64, 8, 2)], 512: [(16, 8, 2), (32, 8, 2)], 1024: [(16, 8, 2)]},
}


@triton.jit
def _load_rows(ptr, rows, dims, n_rows, D, stride_r, stride_d):
    """The (len(rows), len(dims)) tile of a (n_rows, D) matrix, zero outside it; 64-bit offsets."""
    offs = rows[:, None].to(tl.int64) * stride_r + dims[None, :].to(tl.int64) * stride_d
    return tl.load(ptr + offs, mask=(rows[:, None] < n_rows) & (dims[None, :] < D), other=0.0)


@triton.jit
def _load_coef(ptr, idx, n):
    """Columns idx of a (5, n) contiguous coefficient matrix [g, lse, lse_pos, inv_count, r], the
    two lse in log2 units; entries past n give weight 0 (g = 0, lse = lse_pos = +inf so that
    every exp2 is 0)."""
    ok = idx < n
    at = ptr + idx.to(tl.int64)  # stepped one row (n) at a time: no 32-bit r * n product
    g = tl.load(at, mask=ok, other=0.0)
    at += n
    lse = tl.load(at, mask=ok, other=float("inf")) * 1.4426950408889634
    at += n
    lse_pos = tl.load(at, mask=ok, other=float("inf")) * 1.4426950408889634
    at += n
    inv_count = tl.load(at, mask=ok, other=0.0)
    at += n
    share = tl.load(at, mask=ok, other=0.0)
    return g, lse, lse_pos, inv_count, share


@triton.jit
def _weights(s, pos, g, lse, lse_pos, inv_count, share):
    """Backward weights of the tile s (log2 units) for one anchor per row ((P, 1) coefficients)
    or per column ((1, Q)): g exp(s - lse) off pos, g ((q - inv_count) - q share) on pos,
    q = exp(s - lse_pos) and exactly 1 for a single positive. One exp2 per element; left-out
    pairs are the caller's to zero with tl.where (their exp may be inf)."""
    e = tl.exp2(s - tl.where(pos, lse_pos, lse))
    q = tl.where(inv_count == 1.0, 1.0, e)
    return g * tl.where(pos, (q - inv_count) - q * share, e)


@triton.jit
def _w_dot(w, x, RESCALE_W: tl.constexpr, PRECISION: tl.constexpr):
    """w (P, Q) float32 @ x (Q, R) -> (P, R) float32; w is cast to x's dtype for the dot.

    RESCALE_W (float16): each row of w is divided by its max |w| before the cast and the product
    multiplied back, because mean-reduced losses give weights ~1/M^2 that underflow float16.
    """
    if RESCALE_W:
        r = tl.maximum(tl.max(tl.abs(w), 1), 1e-30)  # the floor keeps 1 / r finite
        w = w * (1.0 / r)[:, None]
        return tl.dot(w.to(x.dtype), x, input_precision=PRECISION) * r[:, None]
    return tl.dot(w.to(x.dtype), x, input_precision=PRECISION)


@triton.jit
def _stats_fwd(
    a_ptr,  # (M, D)
    b_ptr,  # (N, D)
    a_labels_ptr, b_labels_ptr,  # (M,), (N,) int64 contiguous, read when WITH_POS
    scale_ptr,  # () float32
    out_ptr,  # (SPLIT, 4, M) float32 contiguous stats when WITH_POS, else (SPLIT, M) lse; out
    mean_ptr,  # (SPLIT, M, D) float32 contiguous, out when WITH_MEAN
    M, N, D,
    stride_am, stride_ad, stride_bn, stride_bd,
    offset,  # pairs with j - i == offset are left out (N: none)
    cols_per_split,  # program (I, s) streams columns [s * cols_per_split, + cols_per_split)
    skip_ptr,  # () int32, read when SKIPPABLE: nonzero -> the program does nothing
    WITH_POS: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    SKIPPABLE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Stats [lse_neg, lse_pos, sum_pos, count] of BLOCK_M rows per program (only lse_neg, over
    every kept pair, without WITH_POS) over one split of the columns; WITH_MEAN also
    mean_i = sum_j softmax(s_i)_j b_j over the negatives of the split. SKIPPABLE: the Gram
    forward's general scheme, which does nothing when the unshifted one runs (skip_ptr)."""
    if SKIPPABLE:
        if tl.load(skip_ptr) != 0:
            return
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    first = split * cols_per_split
    last = tl.minimum(first + cols_per_split, N)
    dims = tl.arange(0, BLOCK_D)
    a = _load_rows(a_ptr, rows, dims, M, D, stride_am, stride_ad)
    scale2 = tl.load(scale_ptr) * 1.4426950408889634  # logits in log2 units
    if WITH_POS:
        a_labels = tl.load(a_labels_ptr + rows, mask=rows < M, other=0)
    # Online (max, sum) of the negatives and of the positives, in log2 units: the sums hold
    # exp2(s - max), with 0 in place of a -inf max (nothing yet).
    max_neg = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sum_neg = tl.zeros([BLOCK_M], tl.float32)
    max_pos = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sum_pos = tl.zeros([BLOCK_M], tl.float32)
    logit_sum = tl.zeros([BLOCK_M], tl.float32)
    count = tl.zeros([BLOCK_M], tl.float32)
    mean = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        b = _load_rows(b_ptr, cols, dims, last, D, stride_bn, stride_bd)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        keep = (cols[None, :] < last) & (cols[None, :] - rows[:, None] != offset)
        if WITH_POS:
            b_labels = tl.load(b_labels_ptr + cols, mask=cols < last, other=0)
            pos = keep & (a_labels[:, None] == b_labels[None, :])
            neg = keep & (a_labels[:, None] != b_labels[None, :])
        else:
            neg = keep
        max_neg_new = tl.maximum(max_neg, tl.max(tl.where(neg, s, float("-inf")), 1))
        # Shift by 0 where the max is still -inf, to avoid (-inf) - (-inf).
        shift_neg = tl.where(max_neg_new == float("-inf"), 0.0, max_neg_new)
        rescale_neg = tl.exp2(max_neg - shift_neg)
        if WITH_POS:
            max_pos_new = tl.maximum(max_pos, tl.max(tl.where(pos, s, float("-inf")), 1))
            shift_pos = tl.where(max_pos_new == float("-inf"), 0.0, max_pos_new)
            # One exp2 per element, each pair shifted by its own kind's max: a single positive
            # gives exp2(s - s) = 1, so lse_pos = s + log2(1) = s exactly.
            e = tl.exp2(s - tl.where(pos, shift_pos[:, None], shift_neg[:, None]))
            sum_pos = sum_pos * tl.exp2(max_pos - shift_pos) + tl.sum(tl.where(pos, e, 0.0), 1)
            logit_sum += tl.sum(tl.where(pos, s, 0.0), 1)
            count += tl.sum(pos.to(tl.float32), 1)
            max_pos = max_pos_new
        else:
            e = tl.exp2(s - shift_neg[:, None])
        e_neg = tl.where(neg, e, 0.0)  # where, not a product: a left-out pair's exp may be inf
        sum_neg = sum_neg * rescale_neg + tl.sum(e_neg, 1)
        if WITH_MEAN:  # rescaled like sum_neg as the running max moves
            mean = mean * rescale_neg[:, None] + tl.dot(e_neg.to(b.dtype), b,
                                                        input_precision=PRECISION)
        max_neg = max_neg_new
    # A row with nothing of a kind gives -inf + log(0) = -inf. Back to natural units.
    row_ok = rows < M
    offs = rows.to(tl.int64)
    at = out_ptr + split.to(tl.int64) * (4 * M if WITH_POS else M) + offs  # stepped by M
    mean_at = mean_ptr + (split.to(tl.int64) * M + offs[:, None]) * D + dims[None, :]
    tl.store(at, (max_neg + tl.log2(sum_neg)) * 0.6931471805599453, mask=row_ok)
    if WITH_POS:
        at += M
        tl.store(at, (max_pos + tl.log2(sum_pos)) * 0.6931471805599453, mask=row_ok)
        at += M
        tl.store(at, logit_sum * 0.6931471805599453, mask=row_ok)
        at += M
        tl.store(at, count, mask=row_ok)
    if WITH_MEAN:
        tl.store(mean_at, mean / sum_neg[:, None], mask=row_ok[:, None] & (dims[None, :] < D))


@triton.jit
def _stats_bwd(
    a_ptr,  # (M, D)
    b_ptr,  # (N, D)
    a_labels_ptr, b_labels_ptr,  # (M,), (N,) int64 contiguous
    scale_ptr,  # () float32
    coef_ptr,  # (5, M) float32 contiguous row coefficients, read when HAS_ROW
    col_coef_ptr,  # (5, N) float32 contiguous column coefficients, read when HAS_COL
    da_ptr,  # (M, D) float32 contiguous, out
    M, N, D,
    stride_am, stride_ad, stride_bn, stride_bd,
    offset,  # pairs with j - i == offset are left out (N: none)
    HAS_ROW: tl.constexpr,
    HAS_COL: tl.constexpr,
    RESCALE_W: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """da = scale W b for the rows of block I, W the rows' weights (HAS_ROW) plus the columns'
    (HAS_COL)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    a = _load_rows(a_ptr, rows, dims, M, D, stride_am, stride_ad)
    scale = tl.load(scale_ptr)
    scale2 = scale * 1.4426950408889634  # logits in log2 units, as the coefficients' lse
    a_labels = tl.load(a_labels_ptr + rows, mask=row_ok, other=0)
    if HAS_ROW:
        g, lse, lse_pos, inv_count, share = _load_coef(coef_ptr, rows, M)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        b = _load_rows(b_ptr, cols, dims, N, D, stride_bn, stride_bd)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        keep = row_ok[:, None] & col_ok[None, :] & (cols[None, :] - rows[:, None] != offset)
        b_labels = tl.load(b_labels_ptr + cols, mask=col_ok, other=0)
        pos = keep & (a_labels[:, None] == b_labels[None, :])
        if HAS_ROW:
            w = _weights(s, pos, g[:, None], lse[:, None], lse_pos[:, None], inv_count[:, None],
                         share[:, None])
        else:
            w = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_COL:
            cg, clse, clse_pos, cinv_count, cshare = _load_coef(col_coef_ptr, cols, N)
            w += _weights(s, pos, cg[None, :], clse[None, :], clse_pos[None, :],
                          cinv_count[None, :], cshare[None, :])
        w = tl.where(keep, w, 0.0)  # where, not a product: a left-out pair's exp may be inf
        acc += _w_dot(w, b, RESCALE_W, PRECISION)
    da_offs = rows[:, None].to(tl.int64) * D + dims[None, :]
    tl.store(da_ptr + da_offs, acc * scale, mask=row_ok[:, None] & (dims[None, :] < D))


@triton.jit
def _gram_unshifted(
    u_ptr,  # (M, D)
    labels_ptr,  # (M,) int64 contiguous
    scale_ptr,  # () float32
    run_ptr,  # () int32: zero -> the program does nothing (the general scheme runs instead)
    sums_ptr,  # (4, M) float32 contiguous, zeroed; added to
    M, D, stride_m, stride_d,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # == BLOCK_M: the tiles J == I sit on the diagonal
    BLOCK_D: tl.constexpr,
):
    """Gram forward over the tiles J >= I only, without any shift (the launcher checked that
    every |s_ij| is small enough, see ``gram_stats_fwd``): each tile's exp2(s) is summed along its
    rows for the rows of block I and, off the diagonal, along its columns for the rows of block
    J (s_ij = s_ji, labels alike). Adds to sums (4, M) = [sum over the negatives of exp2(s),
    the same over the positives, the positives' logits (log2 units), their count]."""
    if tl.load(run_ptr) == 0:
        return
    first = tl.program_id(0) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    a = _load_rows(u_ptr, rows, dims, M, D, stride_m, stride_d)
    scale2 = tl.load(scale_ptr) * 1.4426950408889634
    a_labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    sum_neg = tl.zeros([BLOCK_M], tl.float32)
    sum_pos = tl.zeros([BLOCK_M], tl.float32)
    logit_sum = tl.zeros([BLOCK_M], tl.float32)
    count = tl.zeros([BLOCK_M], tl.float32)
    for start in range(first, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        b = _load_rows(u_ptr, cols, dims, M, D, stride_m, stride_d)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale2
        keep = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != rows[:, None])
        same = a_labels[:, None] == tl.load(labels_ptr + cols, mask=col_ok, other=0)[None, :]
        pos = keep & same
        e = tl.exp2(s)
        e_neg = tl.where(keep & ~same, e, 0.0)
        e_pos = tl.where(pos, e, 0.0)
        s_pos = tl.where(pos, s, 0.0)
        n_pos = pos.to(tl.float32)
        col_count = tl.sum(n_pos, 0)
        sum_neg += tl.sum(e_neg, 1)
        sum_pos += tl.sum(e_pos, 1)
        logit_sum += tl.sum(s_pos, 1)
        count += tl.sum(n_pos, 1)
        if start != first:  # the same pairs seen from the rows of block J
            tl.atomic_add(sums_ptr + cols, tl.sum(e_neg, 0), mask=col_ok)
            if tl.max(col_count, 0) > 0:  # runtime branch: positives sit in few tiles
                tl.atomic_add(sums_ptr + M + cols, tl.sum(e_pos, 0), mask=col_ok)
                tl.atomic_add(sums_ptr + 2 * M + cols, tl.sum(s_pos, 0), mask=col_ok)
                tl.atomic_add(sums_ptr + 3 * M + cols, col_count, mask=col_ok)
    tl.atomic_add(sums_ptr + rows, sum_neg, mask=row_ok)
    tl.atomic_add(sums_ptr + M + rows, sum_pos, mask=row_ok)
    tl.atomic_add(sums_ptr + 2 * M + rows, logit_sum, mask=row_ok)
    tl.atomic_add(sums_ptr + 3 * M + rows, count, mask=row_ok)


def _kind(dtype: torch.dtype, precision: str, accumulates: bool) -> str:
    """The TILES key of an operand dtype: "ieee" / "tf32" for fp32 (the dot's precision), "16" or
    "16acc" for bf16 / fp16."""
    if dtype == torch.float32:
        return precision
    return "16acc" if accumulates else "16"


def _autotuned(kernel, accumulates, flags: list[str], reset_to_zero=None):
    """kernel under triton.autotune over the TILES candidates of each launch's (operand kind,
    BLOCK_D); accumulates(constexprs) says whether the launch carries a (BLOCK_M, BLOCK_D)
    accumulator. Keyed on the constexpr flags, BLOCK_D, PRECISION and (added by Triton) the
    argument dtypes. Nothing is timed before the first launch on a GPU."""
    tiles = sorted({t for by_dim in TILES.values() for ts in by_dim.values() for t in ts})
    configs = [triton.Config(dict(BLOCK_M=b, BLOCK_N=b), num_warps=w, num_stages=st)
               for b, w, st in tiles]

    def candidates(configs, named_args, **constexprs):
        kind = _kind(named_args[next(iter(named_args))].dtype, constexprs["PRECISION"],
                     accumulates(constexprs))
        wanted = TILES[kind][constexprs["BLOCK_D"]]
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) in wanted]

    return triton.autotune(configs, key=flags + ["BLOCK_D", "PRECISION"],
                           prune_configs_by={"early_config_prune": candidates},
                           reset_to_zero=reset_to_zero)(kernel)


_stats_fwd_kernel = _autotuned(_stats_fwd, lambda c: c["WITH_MEAN"],
                               ["WITH_POS", "WITH_MEAN", "SKIPPABLE"])
_stats_bwd_kernel = _autotuned(_stats_bwd, lambda c: True,
                               ["HAS_ROW", "HAS_COL", "RESCALE_W"])
_gram_unshifted_kernel = _autotuned(_gram_unshifted, lambda c: False, [],
                                    reset_to_zero=["sums_ptr"])


class _Launch:
    """How one kernel call picks its tiles. On a GPU, with no tiles forced, the autotuned kernel
    chooses among the candidates of (kind, BLOCK_D) (``tuned``); under the interpreter, or with
    block_m / block_n given (tests), the plain kernel runs the first candidate, blocks replaced.
    ``block_m`` / ``block_n`` here are those of the first candidate (or the forced ones) and
    ``block_n_max`` the largest BLOCK_N any candidate may take, for host-side grid arithmetic."""

    def __init__(self, x: torch.Tensor, accumulates: bool, block_m, block_n):
        d = x.shape[1]
        if d > MAX_DIM:
            raise ValueError(f"the GPU contrastive kernels support D <= {MAX_DIM}, got D = {d}")
        self.block_d = next(b for b in CONFIGS["dims"] if b >= d)
        if x.dtype == torch.float32:
            tf32 = torch.backends.cuda.matmul.allow_tf32 and self.block_d in TILES["tf32"]
            # 16-bit operands ignore the precision; fp32 ones are exact unless TF32 is allowed.
            self.precision = "tf32" if tf32 else "ieee"
        else:
            self.precision = "tf32"
        candidates = TILES[_kind(x.dtype, self.precision, accumulates)][self.block_d]
        block, self.warps, self.stages = candidates[0]
        forced = block_m is not None or block_n is not None
        self.tuned = not forced and os.environ.get("TRITON_INTERPRET", "0") != "1"
        self.block_m, self.block_n = block_m or block, block_n or block
        self.block_n_max = max(t[0] for t in candidates) if self.tuned else self.block_n

    def __call__(self, kernel, grid, *args, **flags):
        """kernel[grid](*args, **flags) with the tiles; grid(block_m) -> the launch grid."""
        flags.update(PRECISION=self.precision, BLOCK_D=self.block_d)
        if self.tuned:
            kernel[lambda meta: grid(meta["BLOCK_M"])](*args, **flags)
        else:
            kernel.fn[grid(self.block_m)](*args, BLOCK_M=self.block_m, BLOCK_N=self.block_n,
                                          num_warps=self.warps, num_stages=self.stages, **flags)


def _offset(m: int, n: int, offset: int, has_diag: bool) -> int:
    """The kernels' left-out offset for (m, n) pairs: j - i == offset, or n (never met) when no
    pair (i < m, j < n) is on that diagonal."""
    return offset if has_diag and -m < offset < n else n


def _labels(x: torch.Tensor) -> torch.Tensor:
    """(n,) integer labels -> contiguous int64 (no copy when already so)."""
    return x.to(torch.int64).contiguous()


def _splits(row_blocks: int, n: int, block_n: int) -> tuple[int, int]:
    """(number of column splits, columns per split): enough programs to fill a GPU when the rows
    are few (a 256-row batch against a 65536-row queue), each split a whole number of blocks of
    at least 4, none empty."""
    split = max(1, min(triton.cdiv(n, 4 * block_n), triton.cdiv(TARGET_PROGRAMS, row_blocks)))
    return whole_block_splits(n, block_n, split)


def _row_fwd(a, b, labels, scale, offset, has_diag, block_m, block_n, with_mean=False,
             skip=None):
    """labels (a_labels, b_labels) -> stats (4, M) of the rows of a against b; labels None ->
    lse (M,) over every kept pair, and with_mean (lse, mean (M, D)). Few rows: the columns are
    split among programs and the splits' statistics merged here (log-sum-exp of the lse, sums of
    the rest: a single positive's lse_pos and sum_pos stay equal). skip: a () int32 device flag,
    nonzero -> the kernel does nothing (the output is then left unwritten)."""
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    with_pos = labels is not None
    launch = _Launch(a, with_mean, block_m, block_n)  # checks D even when there are no rows
    # Splits are whole blocks of every candidate BLOCK_N (powers of 2), so any tile fits them.
    split, per_split = _splits(triton.cdiv(m, launch.block_m), n, launch.block_n_max)
    out = torch.empty((split, 4, m) if with_pos else (split, m), dtype=torch.float32,
                      device=a.device)
    mean = torch.empty(split, m, d, dtype=torch.float32, device=a.device) if with_mean else out
    if m:
        a_labels, b_labels = (_labels(labels[0]), _labels(labels[1])) if with_pos else (out, out)
        launch(_stats_fwd_kernel, lambda block: (triton.cdiv(m, block), split),
               a, b, a_labels, b_labels, scale.float(), out, mean, m, n, d, a.stride(0),
               a.stride(1), b.stride(0), b.stride(1), _offset(m, n, offset, has_diag), per_split,
               out if skip is None else skip, WITH_POS=with_pos, WITH_MEAN=with_mean,
               SKIPPABLE=skip is not None)
    if split == 1:
        out, mean = out[0], mean[0]
    elif with_pos:
        out = torch.cat([torch.logsumexp(out[:, :2], 0), out[:, 2:].sum(0)])
    else:
        lse = torch.logsumexp(out, 0)
        if with_mean:  # each split's mean is normalized by its own sum: reweigh by its share
            share = torch.exp(out - lse)[:, :, None]
            mean = torch.where(share > 0, share * mean, 0.0).sum(0)  # an empty split's is 0/0
        out = lse
    return (out, mean) if with_mean else out


def _row_bwd(a, b, a_labels, b_labels, scale, coef, col_coef, offset, has_diag, block_m,
             block_n):
    """da (M, D) float32 = scale W b, W the rows' weights (coef (5, M), or None) plus the
    columns' (col_coef (5, N), or None)."""
    m, d = a.shape
    n = b.shape[0]
    da = torch.empty(m, d, dtype=torch.float32, device=a.device)
    launch = _Launch(a, True, block_m, block_n)
    if m:
        coef = coef.float().contiguous() if coef is not None else None
        col_coef = col_coef.float().contiguous() if col_coef is not None else None
        launch(_stats_bwd_kernel, lambda block: (triton.cdiv(m, block),),
               a, b, a_labels, b_labels, scale.float(), coef if coef is not None else col_coef,
               col_coef if col_coef is not None else coef, da, m, n, d, a.stride(0), a.stride(1),
               b.stride(0), b.stride(1), _offset(m, n, offset, has_diag),
               HAS_ROW=coef is not None, HAS_COL=col_coef is not None,
               RESCALE_W=a.dtype == torch.float16)
    return da


# Largest bound R on |s_ij| in log2 units for the unshifted Gram forward: 2^-R <= exp2(s) <= 2^R
# are normal fp32 numbers, and so are sums of up to 2^63 of them (2^(57.7 + 63) < 2^128). It is
# 40 in natural units (temperature >= 0.025 for unit rows), the C++ kernels' bound.
MAX_UNSHIFTED_LOG2 = 40.0 * LOG2E


def gram_stats_fwd(u, labels, scale, *, symmetric=None, block_m=None, block_n=None):
    """u (M, D), labels (M,), scale () -> stats (4, M) float32 = [lse_neg, lse_pos, sum_pos,
    count] over j != i.

    With enough rows to fill the GPU (symmetric=None; True / False force it) the logits' bound
    R = |scale| max_i |u_i|^2 decides, on the device (no host sync), between two schemes, both
    launched, one doing nothing: R small enough (unit rows at temperature >= 0.025) ->
    ``_gram_unshifted_kernel`` over half the tiles; else the general row-stationary kernel.
    Under torch.use_deterministic_algorithms only the general one runs (the other's column sums
    are float atomics, added in no fixed order)."""
    labels = _labels(labels)
    m = u.shape[0]
    launch = _Launch(u, False, block_m, block_n)
    if symmetric is None:
        symmetric = triton.cdiv(m, launch.block_m) >= TARGET_PROGRAMS // 4
    if not symmetric or not m or torch.are_deterministic_algorithms_enabled():
        return _row_fwd(u, u, (labels, labels), scale, 0, True, block_m, block_n)
    scale = scale.float()
    # max_i |u_i|^2 from fp32 row norms, without an fp32 copy of u
    max_sq_norm = torch.linalg.vector_norm(u, dim=1, dtype=torch.float32).amax().square()
    bound = (scale.abs() * LOG2E) * max_sq_norm
    run = (bound <= MAX_UNSHIFTED_LOG2).to(torch.int32)  # NaN / inf inputs: False
    sums = torch.zeros(4, m, dtype=torch.float32, device=u.device)
    launch(_gram_unshifted_kernel, lambda block: (triton.cdiv(m, block),),
           u, labels, scale, run, sums, m, u.shape[1], u.stride(0), u.stride(1))
    # The general kernel runs its first candidate here: timing it while it does nothing would
    # tune it on nothing.
    general = _row_fwd(u, u, (labels, labels), scale, 0, True, launch.block_m, launch.block_n,
                       skip=run)
    sum_neg, sum_pos, logit_sum, count = sums
    logit_sum = logit_sum * LN2
    # A single positive's lse is its logit, exactly as the general scheme gives it.
    lse_pos = torch.where(count == 1, logit_sum, torch.log(sum_pos))
    unshifted = torch.stack([torch.log(sum_neg), lse_pos, logit_sum, count])
    return torch.where(run.bool(), unshifted, general)


def gram_stats_bwd(u, labels, scale, coef, *, block=None):
    """u (M, D), labels (M,), scale (), coef (5, M) -> du (M, D) float32 = scale (W + W^T) u,
    W the rows' weights (self-pairs 0): one row-stationary pass, the rows' and the columns'
    weights of each tile from the same coefficients."""
    labels = _labels(labels)
    return _row_bwd(u, u, labels, labels, scale, coef, coef, 0, True, block, block)


def bank_lse_fwd(q, bank, scale, *, block_m=None, block_n=None):
    """q (M, D), bank (K, D), scale () -> (lse (M,), mean (M, D) = sum_j softmax(s_i)_j bank_j)."""
    return _row_fwd(q, bank, None, scale, 0, False, block_m, block_n, with_mean=True)


def cross_stats_fwd(q, k, q_labels, k_labels, scale, diag_offset, has_diag, with_col, *,
                    block_m=None, block_n=None):
    """q (M, D), k (N, D), labels (M,), (N,), scale () -> (stats (4, M), col stats (4, N) or
    (4, 0)) float32; the columns' are the rows' of the swapped problem."""
    row = _row_fwd(q, k, (q_labels, k_labels), scale, diag_offset, has_diag, block_m, block_n)
    if not with_col:
        return row, row.new_empty(4, 0)
    col = _row_fwd(k, q, (k_labels, q_labels), scale, -diag_offset, has_diag, block_m, block_n)
    return row, col


def cross_stats_bwd(q, k, q_labels, k_labels, scale, diag_offset, has_diag, coef, col_coef,
                    need_dk, *, block_m=None, block_n=None):
    """coef (5, M), col_coef (5, N) or (5, 0) -> (dq (M, D), dk (N, D) or (0,)) float32:
    dq = scale W k, dk = scale W^T q, W the rows' weights [+ the columns' when col_coef has N].
    dq is a pass stationary on the rows of q, dk one stationary on the rows of k (the same
    kernel, sides swapped): no atomics."""
    q_labels, k_labels = _labels(q_labels), _labels(k_labels)
    col_coef = col_coef if col_coef.shape[1] > 0 else None
    dq = _row_bwd(q, k, q_labels, k_labels, scale, coef, col_coef, diag_offset, has_diag,
                  block_m, block_n)
    if not need_dk:
        return dq, dq.new_empty(0)
    dk = _row_bwd(k, q, k_labels, q_labels, scale, col_coef, coef, -diag_offset, has_diag,
                  block_m, block_n)
    return dq, dk
