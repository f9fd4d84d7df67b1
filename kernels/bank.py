"""Triton kernels of the queue / memory-bank op family (CUDA; tested on CPU under the interpreter).
Contracts in fastcl/ops/bank.py.

* ``ring_enqueue``: ``_ring_enqueue_kernel`` copies keys (B, D), cast to the queue's dtype, into
  rows (pointer + b) % S of the queue, reading pointer from device memory;
  ``_ring_advance_kernel`` (one program, launched after it, so that no program of the copy can
  see a moved pointer) advances pointer and count.
* ``bank_update``: ``_bank_update_kernel``, one program per batch position; a position whose
  index occurs again later in the batch writes nothing (the last occurrence wins), so each bank
  row has one writer and reads its old value.
* ``sampled_lse_fwd`` / ``sampled_lse_bwd``: one program per anchor, which loads its K + 1 bank
  rows BLOCK_K at a time through their indices (the gather is the load: no (B, K + 1, D) tensor)
  with the whole row of D features in registers. Forward keeps the positive logit (column 0),
  an online (max, sum) for the lse and a running sum of softplus terms; backward recomputes the
  logits from the rows it loads again and accumulates d f_b = scale * sum_j w_bj row_j.

fp32 arithmetic for every input dtype; offsets are 64-bit. Block sizes are keyword arguments so
that tests can make them small. Nothing here queries the GPU at import time.

Work and floor: the sampled kernels are gathers, B (K + 1) rows of D elements read forward and
again backward (2 B (K + 1) D FLOP each way, negligible): InstDisc's B = 256, K = 4096, D = 128
in fp32 is 537 MB, ~0.13 ms each way at 4.3 TB/s if the random 512-byte rows stream at the copy
rate (each row is one coalesced load). One program per anchor gives B programs: ~2 per SM at
B = 256, so latency rather than bandwidth may bound it; splitting K over programs would help.
The update writes each bank row once (duplicates resolved before the launch, no atomics); the
ring copy moves B D elements.
"""
import torch
import triton
import triton.language as tl

# What the launchers choose from, read by them and by fastcl.kernels.aot
# (tests/kernels/test_gpu_compile.py compiles every entry for sm_80 and sm_90): the bank's /
# queue's dtypes (the (B, D) features are converted to float32 first, a negligible copy: the
# kernels compute in float32 anyway), and the padded row widths BLOCK_D of the update and sampled
# kernels (D padded to the first bucket >= D).
CONFIGS = dict(dtypes=(torch.float32, torch.bfloat16, torch.float16),
               dims=(64, 128, 256, 512, 1024))
_RING_BLOCK_D = 128  # the ring copy loops over D in blocks of this width


@triton.jit
def _ring_enqueue_kernel(
    queue_ptr,  # (S, D), contiguous, written
    pointer_ptr,  # () int64, read
    keys_ptr,  # (B, D)
    B, D, S, stride_kb, stride_kd,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    start = tl.load(pointer_ptr)
    dest = (start + rows.to(tl.int64)) % S
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < B) & (cols[None, :] < D)
        src = rows[:, None].to(tl.int64) * stride_kb + cols[None, :].to(tl.int64) * stride_kd
        keys = tl.load(keys_ptr + src, mask=mask)
        out = queue_ptr + dest[:, None] * D + cols[None, :]
        tl.store(out, keys, mask=mask)


@triton.jit
def _ring_advance_kernel(pointer_ptr, count_ptr, B, S):
    tl.store(pointer_ptr, (tl.load(pointer_ptr) + B) % S)
    tl.store(count_ptr, tl.minimum(tl.load(count_ptr) + B, S))


def ring_enqueue(queue, pointer, count, keys, *, block_b=16, block_d=_RING_BLOCK_D):
    """queue (S, D) contiguous, pointer () int64, count () int64, keys (B, D), B <= S: in place."""
    b, d = keys.shape
    s = queue.shape[0]
    keys = keys.to(queue.dtype)  # rounded by torch (to nearest even), so the kernel only copies
    _ring_enqueue_kernel[(triton.cdiv(b, block_b),)](
        queue, pointer, keys, b, d, s, keys.stride(0), keys.stride(1),
        BLOCK_B=block_b, BLOCK_D=block_d,
    )
    _ring_advance_kernel[(1,)](pointer, count, b, s)


@triton.jit
def _bank_update_kernel(
    bank_ptr,  # (N, D), contiguous, updated in place
    indices_ptr,  # (B,) int64
    features_ptr,  # (B, D)
    last_ptr,  # (B,) uint8: 1 where this position is its index's last occurrence
    D, stride_fb, stride_fd,
    momentum, eps,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    # A position that is not its index's last occurrence masks out its whole row.
    mask = cols < tl.where(tl.load(last_ptr + b) != 0, D, 0)
    row = bank_ptr + tl.load(indices_ptr + b) * D + cols
    v = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(features_ptr + b.to(tl.int64) * stride_fb + cols.to(tl.int64) * stride_fd,
                mask=mask, other=0.0).to(tl.float32)
    mixed = momentum * v + (1.0 - momentum) * f
    norm = tl.sqrt(tl.sum(mixed * mixed, 0))
    tl.store(row, (mixed / tl.maximum(norm, eps)).to(bank_ptr.dtype.element_ty), mask=mask)


def bank_update(bank, indices, features, last, momentum, *, eps=1e-12):
    """bank (N, D) contiguous, indices (B,) int64, features (B, D), last (B,) bool: in place."""
    b, d = features.shape
    features = features.float()
    _bank_update_kernel[(b,)](
        bank, indices, features, last.to(torch.uint8), d, features.stride(0), features.stride(1),
        float(momentum), eps, BLOCK_D=_block_d(d),
    )


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow, accurate where exp(x) is tiny (log1p by Kahan's trick:
    log(u) * e / (u - 1) with u = 1 + e cancels the rounding of u)."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    exact = u == 1.0
    log1p = tl.where(exact, e, tl.log(u) * e / tl.where(exact, 1.0, u - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _sampled_logits(f, bank_ptr, idx_ptr, j, K1, D, scale,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows (BLOCK_K, BLOCK_D) fp32, s (BLOCK_K,)) for sampled columns j..j + BLOCK_K of one
    anchor with features f (BLOCK_D,); s is -inf past column K1."""
    cols = j + tl.arange(0, BLOCK_K)
    feats = tl.arange(0, BLOCK_D)
    valid = cols < K1
    index = tl.load(idx_ptr + cols, mask=valid, other=0)
    offs = index[:, None] * D + feats[None, :]
    rows = tl.load(bank_ptr + offs, mask=valid[:, None] & (feats[None, :] < D),
                   other=0.0).to(tl.float32)
    s = tl.sum(rows * f[None, :], 1) * scale
    return rows, tl.where(valid, s, float("-inf"))


@triton.jit
def _anchor(f_ptr, scale_ptr, shift_ptr, D, stride_fb, stride_fd, BLOCK_D: tl.constexpr):
    """This program's anchor b: its features f (BLOCK_D,) in fp32 (0 past D), the scale and the
    NCE shift."""
    b = tl.program_id(0).to(tl.int64)
    feats = tl.arange(0, BLOCK_D)
    f = tl.load(f_ptr + b * stride_fb + feats * stride_fd, mask=feats < D, other=0.0)
    return b, f.to(tl.float32), tl.load(scale_ptr), tl.load(shift_ptr)


@triton.jit
def _sampled_lse_fwd_kernel(
    f_ptr,  # (B, D)
    bank_ptr,  # (N, D), contiguous
    idx_ptr,  # (B, K1) int64, contiguous
    scale_ptr,  # () float32
    shift_ptr,  # () float32
    pos_ptr,  # (B,) float32, out
    lse_ptr,  # (B,) float32, out
    nce_ptr,  # (B,) float32, out
    K1, D, stride_fb, stride_fd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, f, scale, shift = _anchor(f_ptr, scale_ptr, shift_ptr, D, stride_fb, stride_fd, BLOCK_D)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)  # per-lane online (max, sum)
    l = tl.zeros([BLOCK_K], tl.float32)
    nce = tl.zeros([BLOCK_K], tl.float32)
    positive = tl.zeros([BLOCK_K], tl.float32)
    for j in range(0, K1, BLOCK_K):
        _, s = _sampled_logits(f, bank_ptr, idx_ptr + b * K1, j, K1, D, scale, BLOCK_K, BLOCK_D)
        positive += tl.where(j + tl.arange(0, BLOCK_K) == 0, s, 0.0)
        m_new = tl.maximum(m, s)
        # A lane that has seen only -inf shifts by 0, avoiding (-inf) - (-inf).
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - base) + tl.exp(s - base)
        m = m_new
        nce += tl.where(s == float("-inf"), 0.0, _softplus(s - shift))
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(l * tl.exp(m - top), 0))
    tl.store(pos_ptr + b, tl.sum(positive, 0))
    tl.store(lse_ptr + b, lse)
    tl.store(nce_ptr + b, tl.sum(nce, 0))


@triton.jit
def _sampled_lse_bwd_kernel(
    f_ptr,  # (B, D)
    bank_ptr,  # (N, D), contiguous
    idx_ptr,  # (B, K1) int64, contiguous
    scale_ptr,  # () float32
    shift_ptr,  # () float32
    lse_ptr,  # (B,) float32
    g_pos_ptr,  # (B,) float32
    g_lse_ptr,  # (B,) float32
    g_nce_ptr,  # (B,) float32
    df_ptr,  # (B, D) float32, out
    K1, D, stride_fb, stride_fd,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, f, scale, shift = _anchor(f_ptr, scale_ptr, shift_ptr, D, stride_fb, stride_fd, BLOCK_D)
    lse = tl.load(lse_ptr + b)
    g_pos = tl.load(g_pos_ptr + b)
    g_lse = tl.load(g_lse_ptr + b)
    g_nce = tl.load(g_nce_ptr + b)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j in range(0, K1, BLOCK_K):
        rows, s = _sampled_logits(f, bank_ptr, idx_ptr + b * K1, j, K1, D, scale,
                                  BLOCK_K, BLOCK_D)
        # exp(-inf) = 0 and sigmoid(-inf) = 1 / (1 + inf) = 0 on the padding columns.
        w = g_lse * tl.exp(s - lse) + g_nce / (1.0 + tl.exp(shift - s))
        w += tl.where(j + tl.arange(0, BLOCK_K) == 0, g_pos, 0.0)
        acc += tl.sum(w[:, None] * rows, 0)
    feats = tl.arange(0, BLOCK_D)
    tl.store(df_ptr + b * D + feats, acc * scale, mask=feats < D)


def _block_d(d):
    """The padded row width: the first of CONFIGS["dims"] >= d."""
    for block_d in CONFIGS["dims"]:
        if block_d >= d:
            return block_d
    raise ValueError(f"the GPU bank kernels support D <= {CONFIGS['dims'][-1]}, got D = {d}")


def _sampled_blocks(d, block_k):
    block_d = _block_d(d)
    # About 8K fp32 values of gathered rows per step, whatever D.
    return block_d, block_k or max(16, min(128, 8192 // block_d))


def sampled_lse_fwd(f, bank, indices, scale, nce_shift, *, block_k=None):
    """f (B, D), bank (N, D), indices (B, K + 1) int64, scale (), nce_shift () ->
    (positive, lse, nce), each (B,) float32."""
    b, d = f.shape
    f = f.float()
    block_d, block_k = _sampled_blocks(d, block_k)
    positive, lse, nce = (torch.empty(b, dtype=torch.float32, device=f.device) for _ in range(3))
    _sampled_lse_fwd_kernel[(b,)](
        f, bank.contiguous(), indices.contiguous(), scale.float(), nce_shift.float(), positive,
        lse, nce,
        indices.shape[1], d, f.stride(0), f.stride(1), BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return positive, lse, nce


def sampled_lse_bwd(f, bank, indices, scale, nce_shift, lse, grad_pos, grad_lse, grad_nce, *,
                    block_k=None):
    """-> d f (B, D) float32 of sum(grad_pos * positive + grad_lse * lse + grad_nce * nce)."""
    b, d = f.shape
    f = f.float()
    block_d, block_k = _sampled_blocks(d, block_k)
    df = torch.empty(b, d, dtype=torch.float32, device=f.device)
    _sampled_lse_bwd_kernel[(b,)](
        f, bank.contiguous(), indices.contiguous(), scale.float(), nce_shift.float(),
        *(x.float().contiguous() for x in (lse, grad_pos, grad_lse, grad_nce)),
        df, indices.shape[1], d, f.stride(0), f.stride(1), BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return df
