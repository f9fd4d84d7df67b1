"""Triton kernels of the siglip op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

For x (M, D), y (N, D), logits t_ij = scale <x_i, y_j> + bias, positives j - i == offset and every
other pair negative (fastcl/ops/siglip.py has the contract), with u = -z t:

With NORMALIZE, each logit is formed from the raw rows and their fp32 inverse norms,
t_ij = scale inv_x_i inv_y_j <x_i, y_j> + bias (SigLIP's normalized features): 16-bit rows go
into tl.dot as they are, never rounded again after normalizing, and every gradient is w.r.t. the
normalized rows (the caller applies the normalization's Jacobian).

* ``_sigmoid_fwd_kernel``: row-stationary; a program owns BLOCK_M rows of x and streams the blocks
  of y, adding each pair's softplus(u) = max(u, 0) + log1p(exp(-|u|)) to its row's loss.
* ``_sigmoid_bwd_kernel``: recomputes the tiles; W_ij = -z_ij g_i sigmoid(u_ij). Stationary on
  the rows of x (GRAD_ON_ROWS) it gives dx = scale W y and the per-row sums of W o (x y^T) and of
  W (dscale, dbias, summed by the launcher); stationary on the rows of y (x and y swapped, offset
  negated, g read per column) it gives dy = scale W^T x. Each program writes its own rows once: no
  atomics (flash-attention 2's and Inf-CL's dq and dk passes).

GPU design. Logits are formed in base 2: scale and bias are multiplied by log2(e) once, so each
tile element costs one exp2 (e = exp2(-|u2|), the softplus' log1p and the sigmoid both come from
it: sigmoid(u) = 1 / (1 + e) for u >= 0, e / (1 + e) below) and the loss's max(u, 0) part is
converted with ln(2) once per row. log1p(e) is log2(1 + e) ln(2) e / ((1 + e) - 1) (Goldberg's
correction; e itself where 1 + e rounds to 1), exact to a few ulps for the 1e-30 losses of a
well-separated pair, where log(1 + e) would give 0. bf16 / fp16 operands go into tl.dot as they
are, with fp32 accumulation; fp32 operands as exact fp32 ("ieee") unless
torch.backends.cuda.matmul.allow_tf32 is set, then as tf32. The kernels have the register
shapes of the contrastive ones (a (BLOCK_M, BLOCK_D) operand, a streamed (BLOCK_N, BLOCK_D) block,
a (BLOCK_M, BLOCK_D) fp32 accumulator in backward) and take their launch configurations from the
same tables, ``CONFIGS`` and ``TILES`` of kernels/contrastive.py (autotuned over the same
candidates on a GPU; every candidate compiled for sm_80 / sm_90 by fastcl.kernels.aot), so
D <= MAX_DIM.

Work (M, N rows, D features): forward 2 M N D FLOP and M N exp2; backward two passes of 4 M N D
FLOP (recompute, W @ the other side) and M N exp2 each. At M = N = 16384, D = 256: 137 GFLOP
forward, 550 backward; the bytes (16 MiB per input in fp32) are negligible. Floor on an H200
(790 TFLOP/s bf16 dense, ~4 T exp2/s): forward 0.17 ms of matmul against 0.07 ms of exp2,
forward + backward ~0.9 ms of matmul (0.2 ms of exp2, overlapped).
"""
import torch
import triton
import triton.language as tl

from fastcl.kernels.contrastive import (CONFIGS, MAX_DIM, _autotuned, _Launch, _load_rows, _offset,
                                        _w_dot)

__all__ = ["CONFIGS", "MAX_DIM", "sigmoid_pairs_bwd", "sigmoid_pairs_fwd"]


@triton.jit
def _signed_logits2(a, b, inv_a, inv_b, rows, cols, offset, scale2, bias2,
                    NORMALIZE: tl.constexpr, PRECISION: tl.constexpr):
    """(raw (P, Q) = a_hat b_hat^T, positive mask, u2 = -z t in log2 units) of one tile, a_hat =
    inv_a a when NORMALIZE (inv_a (P,), inv_b (Q,)), else a."""
    raw = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    if NORMALIZE:
        raw = raw * inv_a[:, None] * inv_b[None, :]
    t2 = raw * scale2 + bias2
    pos = cols[None, :] - rows[:, None] == offset
    return raw, pos, tl.where(pos, -t2, t2)


@triton.jit
def _log1p_small(e):
    """log(1 + e) for 0 <= e <= 1, exact to a few ulps however small e is."""
    w = 1.0 + e
    exact = w == 1.0
    return tl.where(exact, e, tl.log2(w) * 0.6931471805599453 * (e / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _load_inverse_norms(ptr, idx, n, NORMALIZE: tl.constexpr):
    """inv[idx] (0 past n), or placeholder ones (unused) without NORMALIZE."""
    inv = tl.zeros(idx.shape, tl.float32) + 1.0
    if NORMALIZE:
        inv = tl.load(ptr + idx, mask=idx < n, other=0.0)
    return inv


@triton.jit
def _sigmoid_fwd(
    x_ptr,  # (M, D)
    y_ptr,  # (N, D)
    inv_x_ptr, inv_y_ptr,  # (M,), (N,) float32 inverse row norms, read when NORMALIZE
    scale_ptr, bias_ptr,  # () float32
    loss_ptr,  # (M,) float32, out
    M, N, D,
    stride_xm, stride_xd, stride_yn, stride_yd,
    offset,  # positives: j - i == offset (N: none)
    NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """row_loss_i = sum_j softplus(u_ij) for the BLOCK_M rows of this program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    x = _load_rows(x_ptr, rows, dims, M, D, stride_xm, stride_xd)
    inv_x = _load_inverse_norms(inv_x_ptr, rows, M, NORMALIZE)
    scale2 = tl.load(scale_ptr) * 1.4426950408889634
    bias2 = tl.load(bias_ptr) * 1.4426950408889634
    linear = tl.zeros([BLOCK_M], tl.float32)  # sum of max(u2, 0), log2 units
    small = tl.zeros([BLOCK_M], tl.float32)  # sum of log1p(exp(-|u|))
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        y = _load_rows(y_ptr, cols, dims, N, D, stride_yn, stride_yd)
        inv_y = _load_inverse_norms(inv_y_ptr, cols, N, NORMALIZE)
        _, _, u2 = _signed_logits2(x, y, inv_x, inv_y, rows, cols, offset, scale2, bias2,
                                   NORMALIZE, PRECISION)
        col_ok = (cols < N)[None, :]
        linear += tl.sum(tl.where(col_ok, tl.maximum(u2, 0.0), 0.0), 1)
        small += tl.sum(tl.where(col_ok, _log1p_small(tl.exp2(-tl.abs(u2))), 0.0), 1)
    tl.store(loss_ptr + rows, linear * 0.6931471805599453 + small, mask=rows < M)


@triton.jit
def _sigmoid_bwd(
    a_ptr,  # (P, D): the stationary side (x, or y for dy)
    b_ptr,  # (Q, D): the streamed side
    inv_a_ptr, inv_b_ptr,  # (P,), (Q,) float32 inverse row norms, read when NORMALIZE
    scale_ptr, bias_ptr,  # () float32
    grad_ptr,  # (M,) float32: g of the rows of x (those of a when GRAD_ON_ROWS, else of b)
    da_ptr,  # (P, D) float32, out
    dscale_ptr, dbias_ptr,  # (P,) float32 per-row partial sums, out when GRAD_ON_ROWS
    P, Q, D,
    stride_ap, stride_ad, stride_bq, stride_bd,
    offset,  # positives: col - row == offset (Q: none)
    GRAD_ON_ROWS: tl.constexpr,
    RESCALE_W: tl.constexpr,
    NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """da = scale W b for the BLOCK_M rows of a this program owns (W the weights of the pairs as
    (row of a, row of b); b_hat for b when NORMALIZE)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < P
    a = _load_rows(a_ptr, rows, dims, P, D, stride_ap, stride_ad)
    inv_a = _load_inverse_norms(inv_a_ptr, rows, P, NORMALIZE)
    scale = tl.load(scale_ptr)
    scale2 = scale * 1.4426950408889634
    bias2 = tl.load(bias_ptr) * 1.4426950408889634
    if GRAD_ON_ROWS:
        g_rows = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dscale = tl.zeros([BLOCK_M], tl.float32)
    dbias = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, Q, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Q
        b = _load_rows(b_ptr, cols, dims, Q, D, stride_bq, stride_bd)
        inv_b = _load_inverse_norms(inv_b_ptr, cols, Q, NORMALIZE)
        raw, pos, u2 = _signed_logits2(a, b, inv_a, inv_b, rows, cols, offset, scale2, bias2,
                                       NORMALIZE, PRECISION)
        e = tl.exp2(-tl.abs(u2))
        sig = tl.where(u2 >= 0, 1.0, e) / (1.0 + e)  # sigmoid(u) = d softplus(u) / du
        if GRAD_ON_ROWS:
            g = g_rows[:, None]
        else:
            g = tl.load(grad_ptr + cols, mask=col_ok, other=0.0)[None, :]
        w = tl.where(row_ok[:, None] & col_ok[None, :], tl.where(pos, -sig, sig) * g, 0.0)
        if NORMALIZE:  # W b_hat = (W inv_b) b
            acc += _w_dot(w * inv_b[None, :], b, RESCALE_W, PRECISION)
        else:
            acc += _w_dot(w, b, RESCALE_W, PRECISION)
        if GRAD_ON_ROWS:
            dscale += tl.sum(w * raw, 1)
            dbias += tl.sum(w, 1)
    da_offs = rows[:, None].to(tl.int64) * D + dims[None, :]
    tl.store(da_ptr + da_offs, acc * scale, mask=row_ok[:, None] & (dims[None, :] < D))
    if GRAD_ON_ROWS:
        tl.store(dscale_ptr + rows, dscale, mask=row_ok)
        tl.store(dbias_ptr + rows, dbias, mask=row_ok)


# Tiles autotuned on a GPU over the contrastive family's candidates (the same register shapes).
_sigmoid_fwd_kernel = _autotuned(_sigmoid_fwd, lambda c: False, ["NORMALIZE"])
_sigmoid_bwd_kernel = _autotuned(_sigmoid_bwd, lambda c: True,
                                 ["GRAD_ON_ROWS", "RESCALE_W", "NORMALIZE"])


def _norms_args(inv_x, inv_y, x):
    """The kernels' (inv_x, inv_y, NORMALIZE): a placeholder tensor where the norms are unused."""
    if inv_x is None:
        return x, x, False
    return inv_x.float().contiguous(), inv_y.float().contiguous(), True


def sigmoid_pairs_fwd(x, y, scale, bias, diag_offset, *, inv_x=None, inv_y=None, block_m=None,
                      block_n=None):
    """x (M, D), y (N, D), scale (), bias () -> row_loss (M,) float32; with inverse row norms
    inv_x (M,), inv_y (N,), those of the normalized rows."""
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    launch = _Launch(x, False, block_m, block_n)  # checks D even when there are no rows
    loss = torch.empty(m, dtype=torch.float32, device=x.device)
    inv_x, inv_y, normalize = _norms_args(inv_x, inv_y, x)
    if m:
        launch(_sigmoid_fwd_kernel, lambda block: (triton.cdiv(m, block),),
               x, y, inv_x, inv_y, scale.float(), bias.float(), loss, m, n, d, x.stride(0),
               x.stride(1), y.stride(0), y.stride(1), _offset(m, n, diag_offset, True),
               NORMALIZE=normalize)
    return loss


def _bwd_pass(a, b, inv_a, inv_b, normalize, scale, bias, grad, offset, grad_on_rows, block_m,
              block_n):
    """da (P, D) float32 and, when grad_on_rows, the per-row partials (dscale, dbias) (P,)."""
    p, q, d = a.shape[0], b.shape[0], a.shape[1]
    launch = _Launch(a, True, block_m, block_n)
    da = torch.empty(p, d, dtype=torch.float32, device=a.device)
    parts = torch.empty(2, p if grad_on_rows else 0, dtype=torch.float32, device=a.device)
    if p:
        launch(_sigmoid_bwd_kernel, lambda block: (triton.cdiv(p, block),),
               a, b, inv_a, inv_b, scale.float(), bias.float(), grad, da, parts[0], parts[1], p,
               q, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
               _offset(p, q, offset, True), GRAD_ON_ROWS=grad_on_rows,
               RESCALE_W=a.dtype == torch.float16, NORMALIZE=normalize)
    return da, parts


def sigmoid_pairs_bwd(x, y, scale, bias, diag_offset, grad, *, inv_x=None, inv_y=None,
                      block_m=None, block_n=None):
    """-> (dx (M, D), dy (N, D), dscale (), dbias ()) float32 for the upstream grad (M,): a pass
    stationary on the rows of x, then one on the rows of y. With inverse row norms, the
    gradients are w.r.t. the normalized rows."""
    grad = grad.float().contiguous()
    inv_x, inv_y, normalize = _norms_args(inv_x, inv_y, x)
    dx, parts = _bwd_pass(x, y, inv_x, inv_y, normalize, scale, bias, grad, diag_offset, True,
                          block_m, block_n)
    dy, _ = _bwd_pass(y, x, inv_y, inv_x, normalize, scale, bias, grad, -diag_offset, False,
                      block_m, block_n)
    return dx, dy, parts[0].sum(), parts[1].sum()
