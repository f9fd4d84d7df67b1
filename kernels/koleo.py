"""Triton kernels of the KoLeo op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

Contract (see fastcl/ops/koleo.py): x (B, D), n_i = x_i / max(||x_i||, eps), j(i) = argmax_{j != i}
n_i . n_j (the lowest j on a tie), r_i = n_i - n_j(i) + eps, d_i = ||r_i||,
loss = -1/B sum_i log(d_i + eps).

* ``_koleo_nn_kernel``, grid (cdiv(B, BLOCK_M),): a program owns BLOCK_M rows and sweeps the
  batch in BLOCK_N-row column tiles; each tile's scores are tl.dot products over BLOCK_D-wide
  slices of D (fp32 accumulation; fp32 operands as exact "ieee" fp32, never tf32, so that the
  neighbours are those of the float32 reference up to rounding), scaled by the columns' inverse
  norms (summed from the same slices). The row's own norm is a positive factor of its scores and
  does not change its argmax. Self and padded columns score -inf; tl.argmax keeps the first
  maximum of a tile and a later tile must be strictly better, so a tie goes to the lowest index.
  Only the running best per row is kept: no (B, B) scores.
* ``_koleo_terms_kernel``, grid (cdiv(B, BLOCK_M),): log(d_i + eps) per row from the neighbour
  rows (gathered), in fp32; the launcher averages them.
* ``_koleo_bwd_kernel``, grid (B,): row i's gradient from the saved neighbours, with the rows that
  chose i listed in CSR form (built by the launcher: an argsort of B integers), so every program
  writes only its own row and no atomics are needed:
      d n_i = c_i r_i - sum_{k : j(k) = i} c_k r_k,   c_k = -grad / (B d_k (d_k + eps)),
      d x_i = (d n_i - n_i (n_i . d n_i)) / ||x_i||   (||x_i|| >= eps; else d n_i / eps).
  A whole row lives in registers (BLOCK_D = next power of two >= D, D <= MAX_DIM).

Work and floor (B rows of D features): the search is 2 B^2 D FLOP (B = 2 x 512 DINOv2 CLS rows per
GPU of D = 1024: 1 GFLOP, ~1 us of tensor-core time; the launch dominates), reading the rows
B / BLOCK_M times from L2; the rest is O(B D). Offsets are 64-bit. Nothing here queries the GPU at
import time.
"""
import torch
import triton
import triton.language as tl

# Backward keeps a whole row in registers.
MAX_DIM = 4096
# What the launchers choose from, read by them and by fastcl.kernels.aot
# (tests/kernels/test_gpu_compile.py compiles every entry for sm_80 and sm_90): the input dtypes,
# and the backward's row widths BLOCK_D (the next power of two >= D, at least 16).
CONFIGS = dict(dtypes=(torch.float32, torch.bfloat16, torch.float16),
               dims=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
# The search's tiles: rows per program, column rows per tile, features per tl.dot slice.
_TILE = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_D=32, num_warps=4)


@triton.jit
def _koleo_nn_kernel(
    x_ptr,  # (B, D)
    neighbour_ptr,  # (B,) int64 out
    B, D, stride_b, stride_d, eps,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    # Any other row, kept only if every score is NaN (the loss is then NaN anyway).
    arg = tl.where(rows == 0, 1, 0).to(tl.int64)
    for j0 in range(0, B, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < B
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        sq = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_b
                        + ks[None, :].to(tl.int64) * stride_d,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(x_ptr + cols[:, None].to(tl.int64) * stride_b
                        + ks[None, :].to(tl.int64) * stride_d,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
            bf = b.to(tl.float32)
            sq += tl.sum(bf * bf, 1)
        inv = 1.0 / tl.maximum(tl.sqrt(sq), eps)
        s = acc * inv[None, :]
        keep = col_ok[None, :] & (cols[None, :] != rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        tile_best = tl.max(s, 1)
        tile_arg = tl.argmax(s, 1).to(tl.int64) + j0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)
    tl.store(neighbour_ptr + rows, arg, mask=row_ok)


@triton.jit
def _pair_slices(x_ptr, rows, nb, k0, B, D, stride_b, stride_d, BLOCK_D: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_D of the rows and of their neighbours, fp32 (0 outside), and
    where they are inside."""
    ks = k0 + tl.arange(0, BLOCK_D)
    mask = (rows < B)[:, None] & (ks[None, :] < D)
    xi = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_b
                 + ks[None, :].to(tl.int64) * stride_d, mask=mask, other=0.0).to(tl.float32)
    xj = tl.load(x_ptr + nb[:, None] * stride_b + ks[None, :].to(tl.int64) * stride_d,
                 mask=mask, other=0.0).to(tl.float32)
    return xi, xj, mask


@triton.jit
def _koleo_terms_kernel(
    x_ptr,  # (B, D)
    neighbour_ptr,  # (B,) int64
    terms_ptr,  # (B,) float32 out: log(d_i + eps)
    B, D, stride_b, stride_d, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    nb = tl.load(neighbour_ptr + rows, mask=rows < B, other=0)
    # Pass 1: both rows' squared norms; pass 2: ||n_i - n_j + eps||^2.
    sq_i = tl.zeros((BLOCK_M,), tl.float32)
    sq_j = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_D):
        xi, xj, _ = _pair_slices(x_ptr, rows, nb, k0, B, D, stride_b, stride_d, BLOCK_D)
        sq_i += tl.sum(xi * xi, 1)
        sq_j += tl.sum(xj * xj, 1)
    inv_i = 1.0 / tl.maximum(tl.sqrt(sq_i), eps)
    inv_j = 1.0 / tl.maximum(tl.sqrt(sq_j), eps)
    dist2 = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_D):
        xi, xj, mask = _pair_slices(x_ptr, rows, nb, k0, B, D, stride_b, stride_d, BLOCK_D)
        r = tl.where(mask, xi * inv_i[:, None] - xj * inv_j[:, None] + eps, 0.0)
        dist2 += tl.sum(r * r, 1)
    tl.store(terms_ptr + rows, tl.log(tl.sqrt(dist2) + eps), mask=rows < B)


@triton.jit
def _unit_row(x_ptr, row, ks, D, stride_b, stride_d, eps):
    """Row `row` of x normalized as F.normalize does, in fp32, and its norm."""
    x = tl.load(x_ptr + row.to(tl.int64) * stride_b + ks.to(tl.int64) * stride_d, mask=ks < D,
                other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 0))
    return x / tl.maximum(norm, eps), norm


@triton.jit
def _pair_coef(n_a, n_b, ks, D, eps, g_over_b):
    """r = n_a - n_b + eps (0 past D) and c = -grad / (B d (d + eps)), d = ||r||."""
    r = tl.where(ks < D, n_a - n_b + eps, 0.0)
    d = tl.sqrt(tl.sum(r * r, 0))
    return r, -g_over_b / (d * (d + eps))


@triton.jit
def _koleo_bwd_kernel(
    x_ptr,  # (B, D)
    neighbour_ptr,  # (B,) int64
    start_ptr,  # (B + 1,) int64: chosen_by[start[i]:start[i + 1]] chose row i
    chosen_by_ptr,  # (B,) int64
    grad_ptr,  # () float32
    out_ptr,  # (B, D) out, x's dtype, contiguous
    B, D, stride_b, stride_d, eps,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    ks = tl.arange(0, BLOCK_D)
    g_over_b = tl.load(grad_ptr) / B
    n_i, norm_i = _unit_row(x_ptr, i, ks, D, stride_b, stride_d, eps)
    n_j, _ = _unit_row(x_ptr, tl.load(neighbour_ptr + i), ks, D, stride_b, stride_d, eps)
    r, c = _pair_coef(n_i, n_j, ks, D, eps, g_over_b)
    dn = c * r
    for e in range(tl.load(start_ptr + i), tl.load(start_ptr + i + 1)):
        n_k, _ = _unit_row(x_ptr, tl.load(chosen_by_ptr + e), ks, D, stride_b, stride_d, eps)
        r, c = _pair_coef(n_k, n_i, ks, D, eps, g_over_b)
        dn -= c * r
    dx = tl.where(norm_i >= eps, (dn - n_i * tl.sum(n_i * dn, 0)) / norm_i, dn / eps)
    tl.store(out_ptr + i.to(tl.int64) * D + ks, dx.to(out_ptr.dtype.element_ty), mask=ks < D)


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def koleo_fwd(x: torch.Tensor, eps: float):
    """x (B, D) float32 / bfloat16 / float16 -> (loss () float32, neighbour (B,) int64)."""
    b, d = x.shape
    neighbour = torch.empty(b, dtype=torch.int64, device=x.device)
    grid = (triton.cdiv(b, _TILE["BLOCK_M"]),)
    _koleo_nn_kernel[grid](x, neighbour, b, d, x.stride(0), x.stride(1), eps,
                           PRECISION=_precision(x), **_TILE)
    terms = torch.empty(b, dtype=torch.float32, device=x.device)
    _koleo_terms_kernel[grid](x, neighbour, terms, b, d, x.stride(0), x.stride(1), eps,
                              BLOCK_M=_TILE["BLOCK_M"], BLOCK_D=_TILE["BLOCK_D"],
                              num_warps=_TILE["num_warps"])
    return -terms.sum() / b, neighbour


def fits(x: torch.Tensor, *_) -> bool:
    """The backward keeps a row in registers: D <= MAX_DIM."""
    return x.shape[-1] <= MAX_DIM


def koleo_bwd(x: torch.Tensor, neighbour: torch.Tensor, grad: torch.Tensor, eps: float):
    """x (B, D), neighbour (B,) int64, grad () -> d x (B, D) in x's dtype; D <= MAX_DIM."""
    b, d = x.shape
    block_d = next(w for w in CONFIGS["dims"] if w >= d)
    chosen_by = torch.argsort(neighbour, stable=True)
    start = torch.zeros(b + 1, dtype=torch.int64, device=x.device)
    start[1:] = torch.cumsum(torch.bincount(neighbour, minlength=b), 0)
    out = torch.empty(b, d, dtype=x.dtype, device=x.device)
    _koleo_bwd_kernel[(b,)](x, neighbour, start, chosen_by, grad.to(torch.float32), out, b, d,
                            x.stride(0), x.stride(1), eps, BLOCK_D=block_d,
                            num_warps=4 if block_d <= 1024 else 8)
    return out
