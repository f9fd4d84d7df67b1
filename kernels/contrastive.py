"""Triton kernels of the contrastive op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

Every op of fastcl/ops/contrastive.py is one "pair problem": logits s_ij = scale <a_i, b_j> for
a (M, D), b (N, D), pairs with j - i == offset optionally left out; of the kept pairs, those with
equal labels are positives and the rest negatives (the module docstring there says why their
statistics are kept apart).

* ``_stats_fwd_kernel``: row-stationary; a program owns BLOCK_M rows of a and streams every block
  of b, keeping per row an online (max, sum) of the negatives and another of the positives (so
  any logit magnitude is exact, and a single positive's lse is its logit exactly), the sum of
  the positive logits and their count: stats (4, M) = [lse_neg, lse_pos, sum_pos, count]. Column
  stats are the same kernel with a and b swapped (offset negated). Without labels (WITH_POS off)
  every kept pair is a negative, and WITH_MEAN also accumulates sum_j softmax(s_i)_j b_j, all
  that the backward of bank negatives needs (``bank_lse_fwd``).
* ``_stats_bwd_kernel``: recomputes the tiles from the inputs and the coefficients
  coef (5, .) = [g, lse, lse_pos, 1 / count, r] of the rows (and of the columns, HAS_COL):
  W_ij = g_i exp(s_ij - lse_i) for a negative, g_i ((q - 1 / count_i) - q r_i) for a positive
  (q = exp(s_ij - lse_pos_i), exactly 1 for a single positive), 0 for a left-out pair;
  da = scale W b, db = scale W^T a. GRAM (a = b = u, columns with the rows' coefficients): the
  tile weights are those of W + W^T, symmetric, so a program visits only the tiles J >= I and
  adds them times u_J to du_I and transposed times u_I to du_J (atomically: other programs own
  those rows).

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
def _load_coef(ptr, idx, n):
    """Columns idx of a (5, n) contiguous coefficient matrix [g, lse, lse_pos, inv_count, r];
    entries past n give weight 0 (g = 0, lse = lse_pos = +inf so that every exp is 0)."""
    ok = idx < n
    at = ptr + idx.to(tl.int64)  # stepped one row (n) at a time: no 32-bit r * n product
    g = tl.load(at, mask=ok, other=0.0)
    at += n
    lse = tl.load(at, mask=ok, other=float("inf"))
    at += n
    lse_pos = tl.load(at, mask=ok, other=float("inf"))
    at += n
    inv_count = tl.load(at, mask=ok, other=0.0)
    at += n
    share = tl.load(at, mask=ok, other=0.0)
    return g, lse, lse_pos, inv_count, share


@triton.jit
def _weights(s, pos, g, lse, lse_pos, inv_count, share):
    """Backward weights of the tile s for one anchor per row ((P, 1) coefficients) or per column
    ((1, Q)): g exp(s - lse) off pos, g ((q - inv_count) - q share) on pos, q = exp(s - lse_pos)
    and exactly 1 for a single positive. One exp per element; left-out pairs are the caller's
    to zero with tl.where (their exp may be inf)."""
    e = tl.exp(s - tl.where(pos, lse_pos, lse))
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
def _stats_fwd_kernel(
    a_ptr,  # (M, D)
    b_ptr,  # (N, D)
    a_labels_ptr, b_labels_ptr,  # (M,), (N,) int64 contiguous, read when WITH_POS
    scale_ptr,  # () float32
    out_ptr,  # (4, M) float32 contiguous stats when WITH_POS, else (M,) lse; out
    mean_ptr,  # (M, D) float32 contiguous, out when WITH_MEAN
    M, N, D,
    stride_am, stride_ad, stride_bn, stride_bd,
    offset,  # pairs with j - i == offset are left out when HAS_DIAG
    HAS_DIAG: tl.constexpr,
    WITH_POS: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Stats [lse_neg, lse_pos, sum_pos, count] of BLOCK_M rows per program (only lse_neg, over
    every kept pair, without WITH_POS); WITH_MEAN also mean_i = sum_j softmax(s_i)_j b_j over the
    negatives."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    a = _load_rows(a_ptr, rows, dims, M, D, stride_am, stride_ad)
    scale = tl.load(scale_ptr)
    if WITH_POS:
        a_labels = tl.load(a_labels_ptr + rows, mask=rows < M, other=0)
    # Online (max, sum) of the negatives and of the positives: the sums hold exp(s - max), with
    # 0 in place of a -inf max (nothing yet).
    max_neg = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sum_neg = tl.zeros([BLOCK_M], tl.float32)
    max_pos = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sum_pos = tl.zeros([BLOCK_M], tl.float32)
    logit_sum = tl.zeros([BLOCK_M], tl.float32)
    count = tl.zeros([BLOCK_M], tl.float32)
    mean = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        b = _load_rows(b_ptr, cols, dims, N, D, stride_bn, stride_bd)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
        keep = cols[None, :] < N
        if HAS_DIAG:
            keep = keep & (cols[None, :] - rows[:, None] != offset)
        if WITH_POS:
            b_labels = tl.load(b_labels_ptr + cols, mask=cols < N, other=0)
            pos = keep & (a_labels[:, None] == b_labels[None, :])
            neg = keep & (a_labels[:, None] != b_labels[None, :])
        else:
            neg = keep
        max_neg_new = tl.maximum(max_neg, tl.max(tl.where(neg, s, float("-inf")), 1))
        # Shift by 0 where the max is still -inf, to avoid (-inf) - (-inf).
        shift_neg = tl.where(max_neg_new == float("-inf"), 0.0, max_neg_new)
        rescale_neg = tl.exp(max_neg - shift_neg)
        if WITH_POS:
            max_pos_new = tl.maximum(max_pos, tl.max(tl.where(pos, s, float("-inf")), 1))
            shift_pos = tl.where(max_pos_new == float("-inf"), 0.0, max_pos_new)
            # One exp per element, each pair shifted by its own kind's max: a single positive
            # gives exp(s - s) = 1, so lse_pos = s + log(1) = s exactly.
            e = tl.exp(s - tl.where(pos, shift_pos[:, None], shift_neg[:, None]))
            sum_pos = sum_pos * tl.exp(max_pos - shift_pos) + tl.sum(tl.where(pos, e, 0.0), 1)
            logit_sum += tl.sum(tl.where(pos, s, 0.0), 1)
            count += tl.sum(pos.to(tl.float32), 1)
            max_pos = max_pos_new
        else:
            e = tl.exp(s - shift_neg[:, None])
        e_neg = tl.where(neg, e, 0.0)  # where, not a product: a left-out pair's exp may be inf
        sum_neg = sum_neg * rescale_neg + tl.sum(e_neg, 1)
        if WITH_MEAN:  # rescaled like sum_neg as the running max moves
            mean = mean * rescale_neg[:, None] + tl.dot(e_neg.to(b.dtype), b,
                                                        input_precision=PRECISION)
        max_neg = max_neg_new
    # A row with nothing of a kind gives -inf + log(0) = -inf.
    row_ok = rows < M
    offs = rows.to(tl.int64)
    at = out_ptr + offs  # stepped one row (M) at a time, as in _load_coef
    tl.store(at, max_neg + tl.log(sum_neg), mask=row_ok)
    if WITH_POS:
        at += M
        tl.store(at, max_pos + tl.log(sum_pos), mask=row_ok)
        at += M
        tl.store(at, logit_sum, mask=row_ok)
        at += M
        tl.store(at, count, mask=row_ok)
    if WITH_MEAN:
        tl.store(mean_ptr + offs[:, None] * D + dims[None, :], mean / sum_neg[:, None],
                 mask=row_ok[:, None] & (dims[None, :] < D))


@triton.jit
def _stats_bwd_kernel(
    a_ptr,  # (M, D)
    b_ptr,  # (N, D); a_ptr when GRAM
    a_labels_ptr, b_labels_ptr,  # (M,), (N,) int64 contiguous
    scale_ptr,  # () float32
    coef_ptr,  # (5, M) float32 contiguous row coefficients
    col_coef_ptr,  # (5, N) float32 contiguous, read when HAS_COL (coef_ptr when GRAM)
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
    a_labels = tl.load(a_labels_ptr + rows, mask=row_ok, other=0)
    g, lse, lse_pos, inv_count, share = _load_coef(coef_ptr, rows, M)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = block * BLOCK_M if GRAM else 0
    for start in range(first, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        b = _load_rows(b_ptr, cols, dims, N, D, stride_bn, stride_bd)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
        keep = row_ok[:, None] & col_ok[None, :]
        if HAS_DIAG:
            keep = keep & (cols[None, :] - rows[:, None] != offset)
        b_labels = tl.load(b_labels_ptr + cols, mask=col_ok, other=0)
        pos = keep & (a_labels[:, None] == b_labels[None, :])
        w = _weights(s, pos, g[:, None], lse[:, None], lse_pos[:, None], inv_count[:, None],
                     share[:, None])
        if HAS_COL:
            cg, clse, clse_pos, cinv_count, cshare = _load_coef(col_coef_ptr, cols, N)
            w += _weights(s, pos, cg[None, :], clse[None, :], clse_pos[None, :],
                          cinv_count[None, :], cshare[None, :])
        w = tl.where(keep, w, 0.0)  # where, not a product: a left-out pair's exp may be inf
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
    bank mean) fit registers and shared memory (<= 100 KiB up to D = 512, ~130 KiB beyond). With
    ptxas for sm_90 / sm_80 (Triton 3.9) the forward spills at most 8 bytes; the backward, whose
    tiles also carry the row and column coefficients, spills up to ~1 KiB at some widths (fp32
    D = 1024 worst; the lse-only kernel spilled ~0.9 KiB there too).
    block_m / block_n override the tile sizes (powers of 2, >= 16)."""
    d = x.shape[1]
    if d > MAX_DIM:
        raise ValueError(f"the GPU contrastive kernels support D <= {MAX_DIM}, got D = {d}")
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every dim >= 16
    if x.dtype == torch.float32:  # exact fp32 dots run on FMA units, operands in registers
        block, warps = (32 if block_d <= 64 else 16), 8
    elif accumulates:
        block, warps = (64 if block_d <= 128 else 32 if block_d <= 256 else 16), 8
    else:
        # BLOCK_D = 256 takes 8 warps: with 4, the positives' statistics spill.
        block, warps = (64, 4) if block_d <= 128 else (64, 8) if block_d <= 256 else (32, 8)
    return dict(
        # Exact fp32 (tests compare with float64); TF32 would keep only 10 mantissa bits.
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m or block, BLOCK_N=block_n or block, BLOCK_D=block_d,
        num_warps=warps, num_stages=3 if block_d <= 128 else 2,
    )


def _offset_matters(m: int, n: int, offset: int, has_diag: bool) -> bool:
    """Whether some pair (i < m, j < n) has j - i == offset."""
    return has_diag and -m < offset < n


def _labels(x: torch.Tensor) -> torch.Tensor:
    """(n,) integer labels -> contiguous int64 (no copy when already so)."""
    return x.to(torch.int64).contiguous()


def _row_fwd(a, b, labels, scale, offset, has_diag, block_m, block_n, with_mean=False):
    """labels (a_labels, b_labels) -> stats (4, M) of the rows of a against b; labels None ->
    lse (M,) over every kept pair, and with_mean (lse, mean (M, D))."""
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    with_pos = labels is not None
    out = torch.empty((4, m) if with_pos else (m,), dtype=torch.float32, device=a.device)
    mean = torch.empty(m, d, dtype=torch.float32, device=a.device) if with_mean else out
    cfg = _config(a, with_mean, block_m, block_n)  # checks D even when there are no rows
    if m:
        a_labels, b_labels = (_labels(labels[0]), _labels(labels[1])) if with_pos else (out, out)
        _stats_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            a, b, a_labels, b_labels, scale.float(), out, mean, m, n, d, a.stride(0), a.stride(1),
            b.stride(0), b.stride(1), offset, HAS_DIAG=_offset_matters(m, n, offset, has_diag),
            WITH_POS=with_pos, WITH_MEAN=with_mean, **cfg,
        )
    return (out, mean) if with_mean else out


def gram_stats_fwd(u, labels, scale, *, block_m=None, block_n=None):
    """u (M, D), labels (M,), scale () -> stats (4, M) float32 = [lse_neg, lse_pos, sum_pos,
    count] over j != i."""
    return _row_fwd(u, u, (labels, labels), scale, 0, True, block_m, block_n)


def gram_stats_bwd(u, labels, scale, coef, *, block=None):
    """u (M, D), labels (M,), scale (), coef (5, M) -> du (M, D) float32 = scale (W + W^T) u,
    W the rows' weights (self-pairs 0). Tiles are square (block)."""
    m, d = u.shape
    du = torch.zeros(m, d, dtype=torch.float32, device=u.device)
    cfg = _config(u, True, block, block)
    if m:
        labels, coef = _labels(labels), coef.float().contiguous()
        _stats_bwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            u, u, labels, labels, scale.float(), coef, coef, du, du, m, m, d,
            u.stride(0), u.stride(1), u.stride(0), u.stride(1), 0,
            HAS_DIAG=True, HAS_COL=True, NEED_DB=True, GRAM=True,
            RESCALE_W=u.dtype == torch.float16, **cfg,
        )
    return du


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
    dq = scale W k, dk = scale W^T q, W the rows' weights [+ the columns' when col_coef has N]."""
    m, d = q.shape
    n = k.shape[0]
    dq = torch.empty(m, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(n, d, dtype=torch.float32, device=q.device) if need_dk else dq.new_empty(0)
    cfg = _config(q, True, block_m, block_n)
    if m:
        coef = coef.float().contiguous()
        has_col = col_coef.shape[1] > 0
        col_coef = col_coef.float().contiguous() if has_col else coef  # not read without columns
        _stats_bwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            q, k, _labels(q_labels), _labels(k_labels), scale.float(), coef, col_coef, dq,
            dk if need_dk else dq, m, n, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            diag_offset, HAS_DIAG=_offset_matters(m, n, diag_offset, has_diag), HAS_COL=has_col,
            NEED_DB=need_dk, GRAM=False, RESCALE_W=q.dtype == torch.float16, **cfg,
        )
    return dq, dk
