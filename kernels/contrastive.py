"""Triton kernels of the contrastive op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

Both primitives of fastcl/ops/contrastive.py are one "pair problem": logits s_ij = scale <a_i, b_j>
for a (M, D), b (N, D), pairs with j - i == offset optionally left out.

* ``_lse_fwd_kernel``: row-stationary; a program owns BLOCK_M rows of a and streams every block of
  b, keeping an online (max, sum) per row, so any logit magnitude is exact. Column lse is the same
  kernel with a and b swapped (offset negated). With WITH_MEAN it also accumulates
  sum_j softmax(s_i)_j b_j, all that the backward of bank negatives needs (``bank_lse_fwd``).
* ``_lse_bwd_kernel``: recomputes the tiles from the inputs and the saved lse;
  W_ij = g_i exp(s_ij - lse_i) [+ gc_j exp(s_ij - lsec_j)], da = scale W b, db = scale W^T a.
  GRAM (a = b = u): W is symmetric, so a program visits only the tiles J >= I and adds W_IJ u_J
  to du_I and W_IJ^T u_I to du_J (atomically: other programs own those rows).

Rows of D features live on chip (BLOCK_D = next power of 2 of D), so D <= MAX_DIM; wider inputs
raise ValueError and the caller falls back. Nothing here queries the GPU at import time.
"""
import torch
import triton
import triton.language as tl

MAX_DIM = 1024


@triton.jit
def _load_rows(ptr, rows, dims, n_rows, D, stride_r, stride_d):
    """The (len(rows), len(dims)) tile of a (n_rows, D) matrix, zero outside it; 64-bit offsets."""
    offs = rows[:, None].to(tl.int64) * stride_r + dims[None, :].to(tl.int64) * stride_d
    return tl.load(ptr + offs, mask=(rows[:, None] < n_rows) & (dims[None, :] < D), other=0.0)


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
def _lse_fwd_kernel(
    a_ptr,  # (M, D)
    b_ptr,  # (N, D)
    scale_ptr,  # () float32
    lse_ptr,  # (M,) float32, out
    mean_ptr,  # (M, D) float32 contiguous, out when WITH_MEAN
    M, N, D,
    stride_am, stride_ad, stride_bn, stride_bd,
    offset,  # pairs with j - i == offset are left out when HAS_DIAG
    HAS_DIAG: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """lse_i = log sum_j exp(scale <a_i, b_j>) over kept pairs, for BLOCK_M rows per program;
    WITH_MEAN also mean_i = sum_j softmax(s_i)_j b_j (bank negatives: all their backward needs)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    a = _load_rows(a_ptr, rows, dims, M, D, stride_am, stride_ad)
    scale = tl.load(scale_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mean = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        b = _load_rows(b_ptr, cols, dims, N, D, stride_bn, stride_bd)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
        keep = cols[None, :] < N
        if HAS_DIAG:
            keep = keep & (cols[None, :] - rows[:, None] != offset)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing kept yet has max -inf: shift by 0 there to avoid (-inf) - (-inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * rescale + tl.sum(p, 1)
        if WITH_MEAN:  # rescaled like l_i as the running max moves
            mean = mean * rescale[:, None] + tl.dot(p.to(b.dtype), b, input_precision=PRECISION)
        m_i = m_new
    # A row with every pair left out gives -inf + log(0) = -inf.
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=rows < M)
    if WITH_MEAN:
        tl.store(mean_ptr + rows[:, None].to(tl.int64) * D + dims[None, :], mean / l_i[:, None],
                 mask=(rows[:, None] < M) & (dims[None, :] < D))


@triton.jit
def _lse_bwd_kernel(
    a_ptr,  # (M, D)
    b_ptr,  # (N, D); a_ptr when GRAM
    scale_ptr,  # () float32
    lse_row_ptr, grad_row_ptr,  # (M,) float32
    lse_col_ptr, grad_col_ptr,  # (N,) float32, read when HAS_COL
    da_ptr,  # (M, D) float32 contiguous, out (zero-filled when GRAM: accumulated atomically)
    db_ptr,  # (N, D) float32 contiguous, zero-filled, accumulated atomically when NEED_DB
    M, N, D,
    stride_am, stride_ad, stride_bn, stride_bd,
    offset,  # pairs with j - i == offset are left out when HAS_DIAG
    HAS_DIAG: tl.constexpr,
    HAS_COL: tl.constexpr,
    NEED_DB: tl.constexpr,
    GRAM: tl.constexpr,  # a is b, W symmetric: tiles J >= I only (needs BLOCK_M == BLOCK_N)
    RESCALE_W: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """da = scale W b (rows of block I) and, when NEED_DB, db += scale W^T a, for row block I."""
    block = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    a = _load_rows(a_ptr, rows, dims, M, D, stride_am, stride_ad)
    scale = tl.load(scale_ptr)
    # Rows past M get weight 0: lse = +inf makes exp(s - lse) = 0.
    lse_row = tl.load(lse_row_ptr + rows, mask=row_ok, other=float("inf"))
    grad_row = tl.load(grad_row_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = block * BLOCK_M if GRAM else 0
    for start in range(first, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        b = _load_rows(b_ptr, cols, dims, N, D, stride_bn, stride_bd)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
        w = grad_row[:, None] * tl.exp(s - lse_row[:, None])
        if HAS_COL:
            lse_col = tl.load(lse_col_ptr + cols, mask=col_ok, other=float("inf"))
            grad_col = tl.load(grad_col_ptr + cols, mask=col_ok, other=0.0)
            w += grad_col[None, :] * tl.exp(s - lse_col[None, :])
        keep = row_ok[:, None] & col_ok[None, :]
        if HAS_DIAG:
            keep = keep & (cols[None, :] - rows[:, None] != offset)
        w = tl.where(keep, w, 0.0)  # where, not a product: exp(s - lse) may be inf * 0 there
        acc += _w_dot(w, b, RESCALE_W, PRECISION)
        if NEED_DB:
            # GRAM: the diagonal tile's W already holds both (i, j) and (j, i), acc has it all.
            if (not GRAM) or (start != first):
                db = _w_dot(tl.trans(w), a, RESCALE_W, PRECISION) * scale
                db_offs = cols[:, None].to(tl.int64) * D + dims[None, :]
                tl.atomic_add(db_ptr + db_offs, db, mask=col_ok[:, None] & (dims[None, :] < D))
    da_offs = rows[:, None].to(tl.int64) * D + dims[None, :]
    da_mask = row_ok[:, None] & (dims[None, :] < D)
    if GRAM:
        tl.atomic_add(da_ptr + da_offs, acc * scale, mask=da_mask)
    else:
        tl.store(da_ptr + da_offs, acc * scale, mask=da_mask)


def _config(x: torch.Tensor, accumulates: bool, block_m, block_n) -> dict:
    """Compile-time arguments. BLOCK_D holds a whole row; tiles shrink as rows widen so that the
    row block of a, the streamed block of b and any (BLOCK_M, BLOCK_D) fp32 accumulator (backward,
    bank mean) fit registers (no or minor spills with ptxas for sm_90 / sm_80) and shared memory
    (<= 100 KiB up to D = 512, ~130 KiB beyond). block_m / block_n override the tile sizes (powers
    of 2, >= 16)."""
    d = x.shape[1]
    if d > MAX_DIM:
        raise ValueError(f"the GPU contrastive kernels support D <= {MAX_DIM}, got D = {d}")
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every dim >= 16
    if x.dtype == torch.float32:  # exact fp32 dots run on FMA units, operands in registers
        block, warps = (32 if block_d <= 64 else 16), 8
    elif accumulates:
        block, warps = (64 if block_d <= 128 else 32 if block_d <= 256 else 16), 8
    else:
        block, warps = (64, 4) if block_d <= 256 else (32, 8)
    return dict(
        # Exact fp32 (tests compare with float64); TF32 would keep only 10 mantissa bits.
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m or block, BLOCK_N=block_n or block, BLOCK_D=block_d,
        num_warps=warps, num_stages=3 if block_d <= 128 else 2,
    )


def _offset_matters(m: int, n: int, offset: int, has_diag: bool) -> bool:
    """Whether some pair (i < m, j < n) has j - i == offset."""
    return has_diag and -m < offset < n


def _row_lse(a, b, scale, offset, has_diag, block_m, block_n, with_mean=False):
    """lse_i over j of scale <a_i, b_j>, pairs j - i == offset left out when has_diag: (M,);
    with_mean: (lse, mean (M, D) = sum_j softmax(s_i)_j b_j)."""
    m, n = a.shape[0], b.shape[0]
    lse = torch.empty(m, dtype=torch.float32, device=a.device)
    mean = torch.empty(m, a.shape[1], dtype=torch.float32, device=a.device) if with_mean else lse
    cfg = _config(a, with_mean, block_m, block_n)
    _lse_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        a, b, scale, lse, mean, m, n, a.shape[1], a.stride(0), a.stride(1), b.stride(0),
        b.stride(1), offset, HAS_DIAG=_offset_matters(m, n, offset, has_diag),
        WITH_MEAN=with_mean, **cfg,
    )
    return (lse, mean) if with_mean else lse


def gram_lse_fwd(u, scale, *, block_m=None, block_n=None):
    """u (M, D), scale () float32 -> lse (M,) float32, lse_i = log sum_{j != i} exp(s_ij)."""
    return _row_lse(u, u, scale.float(), 0, True, block_m, block_n)


def gram_lse_bwd(u, scale, lse, grad, *, block=None):
    """u (M, D), lse, grad (M,) -> du (M, D) float32 = scale W u,
    W_ij = g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j), W_ii = 0. Tiles are square (block)."""
    m, d = u.shape
    du = torch.zeros(m, d, dtype=torch.float32, device=u.device)
    lse, grad = lse.float().contiguous(), grad.float().contiguous()
    cfg = _config(u, True, block, block)
    _lse_bwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        u, u, scale.float(), lse, grad, lse, grad, du, du, m, m, d,
        u.stride(0), u.stride(1), u.stride(0), u.stride(1), 0,
        HAS_DIAG=True, HAS_COL=True, NEED_DB=True, GRAM=True,
        RESCALE_W=u.dtype == torch.float16, **cfg,
    )
    return du


def bank_lse_fwd(q, bank, scale, *, block_m=None, block_n=None):
    """q (M, D), bank (K, D), scale () -> (lse (M,), mean (M, D) = sum_j softmax(s_i)_j bank_j)."""
    return _row_lse(q, bank, scale.float(), 0, False, block_m, block_n, with_mean=True)


def cross_lse_fwd(q, k, scale, diag_offset, has_diag, with_col, *, block_m=None, block_n=None):
    """q (M, D), k (N, D), scale () -> (row_lse (M,), col_lse (N,) or (0,)), float32."""
    scale = scale.float()
    row = _row_lse(q, k, scale, diag_offset, has_diag, block_m, block_n)
    if not with_col:
        return row, row.new_empty(0)
    return row, _row_lse(k, q, scale, -diag_offset, has_diag, block_m, block_n)


def cross_lse_bwd(q, k, scale, diag_offset, has_diag, row_lse, grad_row, col_lse, grad_col,
                  with_col, need_dk, *, block_m=None, block_n=None):
    """-> (dq (M, D), dk (N, D) or (0,)) float32: dq = scale W k, dk = scale W^T q,
    W_ij = gr_i exp(s_ij - row_lse_i) [+ gc_j exp(s_ij - col_lse_j) when with_col]."""
    m, d = q.shape
    n = k.shape[0]
    dq = torch.empty(m, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(n, d, dtype=torch.float32, device=q.device) if need_dk else dq.new_empty(0)
    row_lse, grad_row = row_lse.float().contiguous(), grad_row.float().contiguous()
    if with_col:
        col_lse, grad_col = col_lse.float().contiguous(), grad_col.float().contiguous()
    else:
        col_lse, grad_col = row_lse, grad_row  # not read
    cfg = _config(q, True, block_m, block_n)
    _lse_bwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        q, k, scale.float(), row_lse, grad_row, col_lse, grad_col, dq, dk if need_dk else dq,
        m, n, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1), diag_offset,
        HAS_DIAG=_offset_matters(m, n, diag_offset, has_diag), HAS_COL=with_col,
        NEED_DB=need_dk, GRAM=False, RESCALE_W=q.dtype == torch.float16, **cfg,
    )
    return dq, dk
