"""Triton kernels of the DINO head op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

Contract (fastcl/ops/dino_head.py): student features (S, B, H), teacher features (T, B, H),
prototypes W_s, W_t (K, H), center c (K,), scales ss, ts, row_weight w (B,); logits
x = student W_s^T, u = teacher W_t^T - c, never written to memory. The S B student rows are
numbered r = s B + b (the layout of the stats); teacher crop t of the same sample is row t B + b.

* ``_head_stats_kernel``: row-stationary; a program owns BLOCK_M rows of one side's features and
  streams BLOCK_N-row tiles of its prototypes over one split of K, keeping per row the online
  max m (input units) and sum l = sum exp2((z - m) ss log2 e): stats [m, log l] of each split,
  merged over the splits in torch (O(splits x rows)). Run once for the student, once for the
  teacher (center subtracted).
* ``_head_rows_kernel``: row-stationary on BLOCK_M student rows, over one split of K: each tile
  recomputes x (one dot) and the paired teachers' softmax sum P = sum_{t paired} p_t (T dots of
  the gathered teacher rows t B + b with the tile of W_t, p from the teacher stats). Forward
  adds sum_k P (x - m_s) ss to the row: the row's cross-entropies sum to n_s lse_s minus that
  (the launcher weighs the rows by w in torch). With GRAD it forms g = n_s q - P (q from the
  student stats) and adds g W_s tile: d student = grad ss w_b acc, the splits' (SPLIT, S B, H)
  partials summed in torch (deterministic, no atomics).
* ``_head_dweight_kernel``: K-stationary; a program owns BLOCK_N prototypes (their W_s, W_t and
  center tiles stay loaded) and streams every student row block, recomputing the same g and
  adding g^T student to its rows of d W_s, written once.

Per tile each student row block costs 1 + T dots forward (plus the stats pass, 1 per side) and
2 + T per backward kernel: the teacher's logits are recomputed for each student crop rather than
combined afterwards, because forming g = n_s q - P element by element in fp32 before the 16-bit
cast keeps the gradients exact where q and P nearly cancel (a combination of separately rounded
q W_s and p W_s products would not).

GPU design: bf16 / fp16 operands go into tl.dot as they are (fp32 accumulation, fp32 statistics
and g); fp32 operands as exact fp32 ("ieee") unless torch.backends.cuda.matmul.allow_tf32 is
set, then as tf32. A whole feature row lives on chip (BLOCK_H = the first of CONFIGS["dims"]
>= H), so H <= MAX_DIM; the op runs its tiled PyTorch path for wider rows. The g of float16
inputs is rescaled per row before its cast (``_w_dot``). Offsets are 64-bit. K is split among
programs when the rows are few (DINO: S B = 640 rows, 10 row blocks). Nothing here queries the
GPU at import time.

Work (S, T crops, B samples, K prototypes, H features): forward 2 (S + T) B K H FLOP for the
stats and 2 (1 + T) S B K H for the loss; backward 2 (2 + T) S B K H per kernel (two kernels).
Exponentials: (S + T) B K for the stats, T S B K for the loss, (1 + T) S B K per backward kernel.
At DINO's S = 10, T = 2, B = 64, K = 65536, H = 256 in bf16: forward 90 GFLOP (~0.11 ms at
790 TFLOP/s) and 0.13 G exp (~0.03 ms at ~4 T exp/s); backward 172 GFLOP (~0.22 ms) and 0.25 G
exp (~0.06 ms). W_s and W_t (32 MiB each in bf16) are re-read by every row block; the grid's
first axis runs the row blocks of one split of K next to each other, so they share it in L2.
"""
import torch
import triton
import triton.language as tl

from fastcl.kernels.contrastive import _w_dot
from fastcl.kernels.tiling import TARGET_PROGRAMS, whole_block_splits

MAX_DIM = 512
# What the launchers choose from, read by them and by fastcl.kernels.aot
# (tests/kernels/test_gpu_compile.py compiles every entry for sm_80 and sm_90): the inputs'
# dtypes and the padded feature widths BLOCK_H (H is padded to the first bucket >= H).
CONFIGS = dict(dtypes=(torch.float32, torch.bfloat16, torch.float16), dims=(64, 128, 256, MAX_DIM))
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per operand kind ("fp32": ieee or tf32 dots, "16":
# bf16 / fp16), pass ("fwd": stats and loss; "bwd": the kernels carrying a (BLOCK_M or BLOCK_N,
# BLOCK_H) fp32 accumulator) and BLOCK_H. Chosen to compile without spills for sm_80 / sm_90;
# not yet timed on a GPU.
TILES = {
    ("16", "fwd"): {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 64, 8, 2),
                    512: (32, 64, 8, 2)},
    ("16", "bwd"): {64: (64, 64, 4, 2), 128: (64, 64, 8, 2), 256: (32, 64, 8, 2),
                    512: (32, 32, 8, 2)},
    ("fp32", "fwd"): {64: (32, 32, 4, 2), 128: (32, 32, 8, 2), 256: (32, 32, 8, 2),
                      512: (16, 32, 8, 2)},
    ("fp32", "bwd"): {64: (32, 32, 4, 2), 128: (32, 32, 8, 2), 256: (16, 32, 8, 2),
                      512: (16, 16, 8, 2)},
}


@triton.jit
def _load_crop_rows(ptr, crop, b, ok, dims, H, stride_c, stride_b, stride_h):
    """Rows (crop, b) of a (C, B, H) tensor as a (len(b), len(dims)) tile, zero outside it."""
    offs = ((crop.to(tl.int64) * stride_c + b.to(tl.int64) * stride_b)[:, None]
            + dims[None, :].to(tl.int64) * stride_h)
    return tl.load(ptr + offs, mask=ok[:, None] & (dims[None, :] < H), other=0.0)


@triton.jit
def _load_weight_rows(ptr, cols, dims, K, H, stride_k, stride_h):
    """Rows cols of a (K, H) matrix as a (len(cols), len(dims)) tile, zero outside it."""
    offs = cols[:, None].to(tl.int64) * stride_k + dims[None, :].to(tl.int64) * stride_h
    return tl.load(ptr + offs, mask=(cols[:, None] < K) & (dims[None, :] < H), other=0.0)


@triton.jit
def _paired_targets(x, teacher_ptr, wt, c, tstats_ptr, ts2, crop, b, ok, dims, T, B, H,
                    stride_tc, stride_tb, stride_th, DIAGONAL: tl.constexpr,
                    PRECISION: tl.constexpr):
    """P (M, N), shaped like the student tile x, = sum over the teacher crops t paired with
    each row's crop of softmax(u_t ts) on the tile: u_t = (teacher rows (t, b)) W_t tile^T - c,
    rebuilt from the teacher stats. Columns where c is +inf and rows past the end get P = 0."""
    p_sum = tl.zeros_like(x)
    for t in range(T):
        y = _load_crop_rows(teacher_ptr, t + 0 * b, b, ok, dims, H, stride_tc, stride_tb,
                            stride_th)
        u = tl.dot(y, tl.trans(wt), input_precision=PRECISION) - c[None, :]
        at = tstats_ptr + (t * B + b)
        m_t = tl.load(at, mask=ok, other=0.0)
        lse2 = tl.load(at + T * B, mask=ok, other=float("inf")) * 1.4426950408889634
        p = tl.exp2((u - m_t[:, None]) * ts2 - lse2[:, None])
        if not DIAGONAL:  # DINO: a crop is not its own target
            p = tl.where(crop[:, None] == t, 0.0, p)
        p_sum += p
    return p_sum


@triton.jit
def _rows_and_split(R, K, k_per_split, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M rows, which of them are < R, its split (64-bit) and the split's
    range [first, end) of K."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1).to(tl.int64)
    first = split * k_per_split
    return rows, rows < R, split, first, tl.minimum(first + k_per_split, K)


@triton.jit
def _head_stats_kernel(
    x_ptr,  # (C, B, H): one side's features
    w_ptr,  # (K, H): its prototypes
    center_ptr,  # (K,) float32 contiguous, read when HAS_CENTER
    scale_ptr,  # () float32
    part_ptr,  # (SPLIT, 2, R) float32 out: [max, log-sum-exp at scale] of each split
    R, B, K, H, k_per_split,
    stride_xc, stride_xb, stride_xh, stride_wk, stride_wh,
    HAS_CENTER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Online [max, lse] of the logits of BLOCK_M rows over K range [split k_per_split, +)."""
    rows, ok, split, first, end = _rows_and_split(R, K, k_per_split, BLOCK_M)
    dims = tl.arange(0, BLOCK_H)
    x = _load_crop_rows(x_ptr, rows // B, rows % B, ok, dims, H, stride_xc, stride_xb, stride_xh)
    scale2 = tl.load(scale_ptr) * 1.4426950408889634
    peak = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for start in range(first, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        w = _load_weight_rows(w_ptr, cols, dims, K, H, stride_wk, stride_wh)
        z = tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if HAS_CENTER:
            z -= tl.load(center_ptr + cols, mask=cols < end, other=0.0)[None, :]
        z = tl.where((cols < end)[None, :], z, float("-inf"))
        new_peak = tl.maximum(peak, tl.max(z, 1))  # finite: every split has a column
        total = (total * tl.exp2((peak - new_peak) * scale2)
                 + tl.sum(tl.exp2((z - new_peak[:, None]) * scale2), 1))
        peak = new_peak
    out = part_ptr + split * 2 * R + rows
    tl.store(out, peak, mask=ok)
    tl.store(out + R, tl.log2(total) * 0.6931471805599453, mask=ok)


@triton.jit
def _logit_grad(x, p_sum, m_s, lse2, ss2, n_s):
    """n_s q - P of a tile: q = softmax(x ss) rebuilt from the student stats (log2 units)."""
    q = tl.exp2((x - m_s[:, None]) * ss2 - lse2[:, None])
    return n_s[:, None] * q - p_sum


@triton.jit
def _student_row_coefs(sstats_ptr, row_weight_ptr, rows, crop, b, ok, R, T,
                       DIAGONAL: tl.constexpr):
    """(m_s, lse_s in log2 units, n_s pairs, row weight w_b) of student rows; rows past the end
    get lse = +inf (q = 0)."""
    m_s = tl.load(sstats_ptr + rows, mask=ok, other=0.0)
    lse2 = tl.load(sstats_ptr + R + rows, mask=ok, other=float("inf")) * 1.4426950408889634
    if DIAGONAL:
        n_s = tl.zeros_like(m_s) + T
    else:  # every teacher crop but the row's own
        n_s = T - (crop < T).to(tl.float32)
    return m_s, lse2, n_s, tl.load(row_weight_ptr + b, mask=ok, other=0.0)


@triton.jit
def _head_rows_kernel(
    student_ptr,  # (S, B, H)
    teacher_ptr,  # (T, B, H)
    ws_ptr, wt_ptr,  # (K, H) each
    center_ptr,  # (K,) float32 contiguous
    sscale_ptr, tscale_ptr, grad_ptr,  # () float32 (grad read when GRAD)
    row_weight_ptr,  # (B,) float32
    sstats_ptr,  # (2, S B) float32: [max, lse] of the student rows
    tstats_ptr,  # (2, T B) float32: the teacher's
    part_ptr,  # float32 out over the split: (SPLIT, S B, H) d student when GRAD, else
    #            (SPLIT, S B) sum_k P (x - m_s) ss
    R, B, K, H, k_per_split, T,
    stride_sc, stride_sb, stride_sh, stride_tc, stride_tb, stride_th,
    stride_wsk, stride_wsh, stride_wtk, stride_wth,
    GRAD: tl.constexpr, DIAGONAL: tl.constexpr, RESCALE_W: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """BLOCK_M student rows over one split of K: the loss part sum_k P (x - m_s) ss or, when
    GRAD, d student = grad ss w_b sum_k (n_s q - P)_k W_s,k."""
    rows, ok, split, first, end = _rows_and_split(R, K, k_per_split, BLOCK_M)
    crop, b = rows // B, rows % B
    dims = tl.arange(0, BLOCK_H)
    x_rows = _load_crop_rows(student_ptr, crop, b, ok, dims, H, stride_sc, stride_sb, stride_sh)
    ss = tl.load(sscale_ptr)
    ts2 = tl.load(tscale_ptr) * 1.4426950408889634
    m_s, lse2, n_s, w_b = _student_row_coefs(sstats_ptr, row_weight_ptr, rows, crop, b, ok, R, T,
                                             DIAGONAL)
    if GRAD:
        acc = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M], tl.float32)
    for start in range(first, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ws = _load_weight_rows(ws_ptr, cols, dims, K, H, stride_wsk, stride_wsh)
        wt = _load_weight_rows(wt_ptr, cols, dims, K, H, stride_wtk, stride_wth)
        c = tl.load(center_ptr + cols, mask=cols < end, other=float("inf"))  # P = 0 past end
        x = tl.dot(x_rows, tl.trans(ws), input_precision=PRECISION)
        p_sum = _paired_targets(x, teacher_ptr, wt, c, tstats_ptr, ts2, crop, b, ok, dims, T, B, H,
                                stride_tc, stride_tb, stride_th, DIAGONAL, PRECISION)
        if GRAD:
            g = _logit_grad(x, p_sum, m_s, lse2, ss * 1.4426950408889634, n_s)
            acc += _w_dot(tl.where((cols < end)[None, :], g, 0.0), ws, RESCALE_W, PRECISION)
        else:
            acc += tl.sum(p_sum * ((x - m_s[:, None]) * ss), 1)  # d is finite where P = 0
    if GRAD:
        out = (split * R + rows)[:, None] * H + dims[None, :]
        coef = tl.load(grad_ptr) * ss * w_b
        tl.store(part_ptr + out, acc * coef[:, None], mask=ok[:, None] & (dims[None, :] < H))
    else:
        tl.store(part_ptr + split * R + rows, acc, mask=ok)


@triton.jit
def _head_dweight_kernel(
    student_ptr,  # (S, B, H)
    teacher_ptr,  # (T, B, H)
    ws_ptr, wt_ptr,  # (K, H) each
    center_ptr,  # (K,) float32 contiguous
    sscale_ptr, tscale_ptr, grad_ptr,  # () float32
    row_weight_ptr,  # (B,) float32
    sstats_ptr, tstats_ptr,  # (2, S B), (2, T B) float32
    dweight_ptr,  # (K, H) contiguous, student_weight's dtype, out
    R, B, K, H, T,
    stride_sc, stride_sb, stride_sh, stride_tc, stride_tb, stride_th,
    stride_wsk, stride_wsh, stride_wtk, stride_wth,
    DIAGONAL: tl.constexpr, RESCALE_W: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """d W_s rows cols = sum over every student row of grad ss w_b (n_s q - P)_k student_row."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    dims = tl.arange(0, BLOCK_H)
    ws = _load_weight_rows(ws_ptr, cols, dims, K, H, stride_wsk, stride_wsh)
    wt = _load_weight_rows(wt_ptr, cols, dims, K, H, stride_wtk, stride_wth)
    c = tl.load(center_ptr + cols, mask=col_ok, other=float("inf"))  # p = 0 past K
    ss = tl.load(sscale_ptr)
    ts2 = tl.load(tscale_ptr) * 1.4426950408889634
    ss2 = ss * 1.4426950408889634
    grad_ss = tl.load(grad_ptr) * ss
    acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for start in range(0, R, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = rows < R
        crop, b = rows // B, rows % B
        x_rows = _load_crop_rows(student_ptr, crop, b, ok, dims, H, stride_sc, stride_sb,
                                 stride_sh)
        m_s, lse2, n_s, w_b = _student_row_coefs(sstats_ptr, row_weight_ptr, rows, crop, b, ok,
                                                 R, T, DIAGONAL)
        x = tl.dot(x_rows, tl.trans(ws), input_precision=PRECISION)
        p_sum = _paired_targets(x, teacher_ptr, wt, c, tstats_ptr, ts2, crop, b, ok, dims, T, B, H,
                                stride_tc, stride_tb, stride_th, DIAGONAL, PRECISION)
        g = _logit_grad(x, p_sum, m_s, lse2, ss2, n_s) * (grad_ss * w_b)[:, None]
        g = tl.where(ok[:, None] & col_ok[None, :], g, 0.0)
        acc += _w_dot(tl.trans(g), x_rows, RESCALE_W, PRECISION)
    out = cols[:, None].to(tl.int64) * H + dims[None, :]
    tl.store(dweight_ptr + out, acc.to(dweight_ptr.dtype.element_ty),
             mask=col_ok[:, None] & (dims[None, :] < H))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def fits(student, *_) -> bool:
    """Whether the kernels take these inputs: feature rows of at most MAX_DIM (else the op runs
    its tiled PyTorch path)."""
    return student.shape[-1] <= MAX_DIM


class _Tiles:
    """The launch configuration of one pass: tiles from TILES (or forced ones, tests), the dot
    precision, BLOCK_H."""

    def __init__(self, x: torch.Tensor, which: str, block_m=None, block_n=None):
        h = x.shape[-1]
        if h > MAX_DIM:
            raise ValueError(f"the GPU DINO head kernels support H <= {MAX_DIM}, got H = {h}")
        self.block_h = next(d for d in CONFIGS["dims"] if d >= h)
        fp32 = x.dtype == torch.float32
        tf32 = fp32 and torch.backends.cuda.matmul.allow_tf32
        self.precision = "tf32" if tf32 or not fp32 else "ieee"
        bm, bn, self.warps, self.stages = TILES["fp32" if fp32 else "16", which][self.block_h]
        self.block_m, self.block_n = block_m or bm, block_n or bn

    def __call__(self, kernel, grid, *args, **flags):
        kernel[grid](*args, PRECISION=self.precision, BLOCK_M=self.block_m,
                     BLOCK_N=self.block_n, BLOCK_H=self.block_h, num_warps=self.warps,
                     num_stages=self.stages, **flags)


def _splits(rows: int, k: int, tiles: _Tiles, split) -> tuple[int, int]:
    """(programs per row block, prototypes per program): K split so that about TARGET_PROGRAMS
    programs run when the rows are few, each split a whole number of at least 4 tiles."""
    row_blocks = triton.cdiv(max(rows, 1), tiles.block_m)
    if split is None:
        split = max(1, min(triton.cdiv(k, 4 * tiles.block_n), triton.cdiv(TARGET_PROGRAMS,
                                                                          row_blocks)))
    return whole_block_splits(k, tiles.block_n, split)


def _strides(*tensors) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def _row_stats(x, weight, center, scale, block_m, block_n, split):
    """x (C, B, H), weight (K, H) -> stats (2, C, B) float32 of x weight^T - center (center None:
    no centering) at scale."""
    c, b, h = x.shape
    k, r = weight.shape[0], c * b
    tiles = _Tiles(x, "fwd", block_m, block_n)
    n_split, per_split = _splits(r, k, tiles, split)
    part = torch.empty(n_split, 2, r, dtype=torch.float32, device=x.device)
    tiles(_head_stats_kernel, (triton.cdiv(r, tiles.block_m), n_split),
          x, weight, part if center is None else center, scale, part, r, b, k, h, per_split,
          *_strides(x, weight), HAS_CENTER=center is not None)
    if n_split == 1:
        return part[0].view(2, c, b)
    peak = part[:, 0].amax(0)
    lse = torch.logsumexp(part[:, 1] + (part[:, 0] - peak) * scale, 0)
    return torch.stack([peak, lse]).view(2, c, b)


def _common(student, teacher, center, student_scale, teacher_scale):
    """float32 center and scales, as the kernels read them."""
    return (center.to(torch.float32).contiguous(), student_scale.float(), teacher_scale.float())


def dino_head_fwd(student, teacher, student_weight, teacher_weight, center, student_scale,
                  teacher_scale, row_weight, diagonal, *, block_m=None, block_n=None, split=None):
    """student (S, B, H), teacher (T, B, H), weights (K, H), center (K,), scales (), row_weight
    (B,), diagonal -> (loss (), student_stats (2, S, B), teacher_stats (2, T, B)) float32.
    block_m / block_n / split force the tiles and the number of programs per row block (tests)."""
    s, b, h = student.shape
    t, k, r = teacher.shape[0], student_weight.shape[0], s * b
    center, ss, ts = _common(student, teacher, center, student_scale, teacher_scale)
    student_stats = _row_stats(student, student_weight, None, ss, block_m, block_n, split)
    teacher_stats = _row_stats(teacher, teacher_weight, center, ts, block_m, block_n, split)
    tiles = _Tiles(student, "fwd", block_m, block_n)
    n_split, per_split = _splits(r, k, tiles, split)
    part = torch.empty(n_split, r, dtype=torch.float32, device=student.device)
    tiles(_head_rows_kernel, (triton.cdiv(r, tiles.block_m), n_split),
          student, teacher, student_weight, teacher_weight, center, ss, ts, ss,
          row_weight.float().contiguous(), student_stats.contiguous(),
          teacher_stats.contiguous(), part, r, b, k, h, per_split, t,
          *_strides(student, teacher, student_weight, teacher_weight), GRAD=False,
          DIAGONAL=diagonal, RESCALE_W=False)
    # Row (s, b): sum over its n_s paired teachers of -sum_k p_t log q_s = n_s lse_s - part.
    n_s = torch.full((s, 1), float(t), device=student.device)
    if not diagonal:
        n_s[:t] -= 1.0
    row_ce = n_s * student_stats[1] - part.sum(0).view(s, b)
    return (row_ce * row_weight.float()).sum(), student_stats, teacher_stats


def dino_head_bwd(student, teacher, student_weight, teacher_weight, center, student_scale,
                  teacher_scale, row_weight, diagonal, student_stats, teacher_stats, grad, *,
                  block_m=None, block_n=None, split=None):
    """-> (d student (S, B, H), d student_weight (K, H)), contiguous, in the inputs' dtypes."""
    s, b, h = student.shape
    t, k, r = teacher.shape[0], student_weight.shape[0], s * b
    center, ss, ts = _common(student, teacher, center, student_scale, teacher_scale)
    common = (student, teacher, student_weight, teacher_weight, center, ss, ts, grad.float(),
              row_weight.float().contiguous(), student_stats.float().contiguous(),
              teacher_stats.float().contiguous())
    strides = _strides(student, teacher, student_weight, teacher_weight)
    flags = dict(DIAGONAL=diagonal, RESCALE_W=student.dtype == torch.float16)
    tiles = _Tiles(student, "bwd", block_m, block_n)
    n_split, per_split = _splits(r, k, tiles, split)
    part = torch.empty(n_split, r, h, dtype=torch.float32, device=student.device)
    tiles(_head_rows_kernel, (triton.cdiv(r, tiles.block_m), n_split),
          *common, part, r, b, k, h, per_split, t, *strides, GRAD=True, **flags)
    dweight = torch.empty(k, h, dtype=student_weight.dtype, device=student.device)
    tiles(_head_dweight_kernel, (triton.cdiv(k, tiles.block_n),),
          *common, dweight, r, b, k, h, t, *strides, **flags)
    return part.sum(0).view(s, b, h).to(student.dtype), dweight
