"""Contrastive op family: the two log-sum-exp primitives every InfoNCE-style loss is built from.

Every loss of the family (NT-Xent, InfoNCE with in-batch or queue negatives, symmetric CLIP/CMC,
supervised contrastive) is ``lse(similarities) - positive term``. The positive terms are O(N*D)
and stay in plain torch; the O(N^2*D) part is one of these ops, which never materialize the
similarity matrix (tiles are recomputed in backward from the inputs and the O(N) lse):

* ``fastcl::gram_lse(u, scale)``: u (M, D) -> lse (M,),
  lse_i = log sum_{j != i} exp(scale * <u_i, u_j>). Only tiles on and above the diagonal are visited.
* ``fastcl::cross_lse(q, k, scale, diag_offset, with_col)``: q (M, D), k (N, D) ->
  (row_lse (M,), col_lse (N,) or (0,)); pairs with j - i == diag_offset are left out when
  diag_offset is not None.
* ``fastcl::bank_lse(q, bank, scale)``: q (M, D), bank (K, D) -> (lse (M,), mean (M, D)), the
  row lse over a bank of negatives (MoCo queue, memory bank) that gets no gradient, plus
  mean_i = sum_j softmax(s_i)_j bank_j, which is the whole backward (dq_i = scale g_i mean_i):
  the bank is read once, in forward.

``scale`` is a 0-dim float32 tensor (1 / temperature) on the inputs' device; it receives a gradient,
computed for free from the input gradients (the logits are linear in scale).
Outputs are float32 (float64 for float64 inputs, which run the reference).

Backends, chosen per device: the C++ kernels of csrc/contrastive.cpp on CPU, the Triton kernels of
kernels/contrastive.py on CUDA, the references below anywhere else (and for float64).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl._backend import accumulation_dtype, kernels_for

# The Triton kernels keep a whole row of features in registers; wider rows use the reference.
TRITON_MAX_DIM = 1024


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, materialize the similarity matrix. The truth in tests.
# ----------------------------------------------------------------------------------------------
def _pair_mask(m: int, n: int, diag_offset: Optional[int], device) -> Optional[Tensor]:
    """(m, n) bool mask of the excluded pairs j - i == diag_offset, or None."""
    if diag_offset is None:
        return None
    rows = torch.arange(m, device=device)[:, None]
    cols = torch.arange(n, device=device)[None, :]
    return cols - rows == diag_offset


def _logits_ref(a: Tensor, b: Tensor, scale: Tensor, diag_offset: Optional[int]) -> Tensor:
    acc = accumulation_dtype(a)
    s = (a.to(acc) @ b.to(acc).T) * scale.to(acc)
    mask = _pair_mask(a.shape[0], b.shape[0], diag_offset, a.device)
    return s if mask is None else s.masked_fill(mask, float("-inf"))


def gram_lse_ref(u: Tensor, scale: Tensor) -> Tensor:
    """u: (M, D), scale: () -> lse (M,) with lse_i = logsumexp_{j != i} scale <u_i, u_j>."""
    return torch.logsumexp(_logits_ref(u, u, scale, 0), dim=1)


def gram_lse_backward_ref(u: Tensor, scale: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    """du (M, D) = scale * W u with W_ij = g_i P_ij + g_j P_ji, P_ij = exp(s_ij - lse_i)."""
    acc = accumulation_dtype(u)
    w = grad.to(acc)[:, None] * torch.exp(_logits_ref(u, u, scale, 0) - lse.to(acc)[:, None])
    return (w + w.T) @ u.to(acc) * scale.to(acc)


def cross_lse_ref(
    q: Tensor, k: Tensor, scale: Tensor, diag_offset: Optional[int], with_col: bool
) -> tuple[Tensor, Tensor]:
    """q: (M, D), k: (N, D) -> (row_lse (M,), col_lse (N,) if with_col else (0,))."""
    s = _logits_ref(q, k, scale, diag_offset)
    col = torch.logsumexp(s, dim=0) if with_col else s.new_empty(0)
    return torch.logsumexp(s, dim=1), col


def cross_lse_backward_ref(
    q: Tensor, k: Tensor, scale: Tensor, diag_offset: Optional[int],
    row_lse: Tensor, grad_row: Tensor, col_lse: Tensor, grad_col: Tensor, need_dk: bool,
) -> tuple[Tensor, Tensor]:
    """(dq (M, D), dk (N, D) or (0,)) with W_ij = gr_i exp(s_ij - lr_i) + gc_j exp(s_ij - lc_j)."""
    acc = accumulation_dtype(q)
    s = _logits_ref(q, k, scale, diag_offset)
    w = grad_row.to(acc)[:, None] * torch.exp(s - row_lse.to(acc)[:, None])
    if col_lse.numel():
        w = w + grad_col.to(acc)[None, :] * torch.exp(s - col_lse.to(acc)[None, :])
    scale = scale.to(acc)
    dq = w @ k.to(acc) * scale
    dk = w.T @ q.to(acc) * scale if need_dk else dq.new_empty(0)
    return dq, dk


def bank_lse_ref(q: Tensor, bank: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """q: (M, D), bank: (K, D) -> (lse (M,), mean (M, D) = softmax(s) @ bank)."""
    s = _logits_ref(q, bank, scale, None)
    return torch.logsumexp(s, dim=1), torch.softmax(s, dim=1) @ bank.to(s.dtype)


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------
def _kernels(x: Tensor):
    return kernels_for(x, "contrastive", triton_fits=x.shape[-1] <= TRITON_MAX_DIM)


def _split_offset(diag_offset: Optional[int]) -> tuple[int, bool]:
    return (0, False) if diag_offset is None else (diag_offset, True)


# ----------------------------------------------------------------------------------------------
# fastcl::gram_lse
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::gram_lse", mutates_args=())
def gram_lse(u: Tensor, scale: Tensor) -> Tensor:
    """u: (M, D), scale: () float32 -> lse (M,), self-pairs excluded."""
    kernels = _kernels(u)
    return gram_lse_ref(u, scale) if kernels is None else kernels.gram_lse_fwd(u, scale)


@gram_lse.register_fake
def _(u, scale):
    return u.new_empty(u.shape[0], dtype=accumulation_dtype(u))


@torch.library.custom_op("fastcl::gram_lse_backward", mutates_args=())
def gram_lse_backward(u: Tensor, scale: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    """Gradient of sum(grad * gram_lse(u, scale)) with respect to u: (M, D), float32."""
    kernels = _kernels(u)
    if kernels is None:
        return gram_lse_backward_ref(u, scale, lse, grad)
    return kernels.gram_lse_bwd(u, scale, lse, grad)


@gram_lse_backward.register_fake
def _(u, scale, lse, grad):
    return u.new_empty(u.shape, dtype=accumulation_dtype(u))


def _gram_lse_setup(ctx, inputs, output):
    u, scale = inputs
    ctx.save_for_backward(u, scale, output)


def _gram_lse_grad(ctx, grad):
    u, scale, lse = ctx.saved_tensors
    du = gram_lse_backward(u, scale, lse, grad)
    dscale = None
    if ctx.needs_input_grad[1]:
        # sum_i <du_i, u_i> = 2 scale * d(sum grad * lse)/dscale, since W is symmetric.
        dscale = ((du * u.to(du.dtype)).sum() / (2 * scale)).to(scale.dtype)
    return du.to(u.dtype), dscale


gram_lse.register_autograd(_gram_lse_grad, setup_context=_gram_lse_setup)


# ----------------------------------------------------------------------------------------------
# fastcl::cross_lse
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::cross_lse", mutates_args=())
def cross_lse(
    q: Tensor, k: Tensor, scale: Tensor, diag_offset: Optional[int], with_col: bool
) -> tuple[Tensor, Tensor]:
    """q: (M, D), k: (N, D), scale: () -> (row_lse (M,), col_lse (N,) or (0,))."""
    kernels = _kernels(q)
    if kernels is None:
        return cross_lse_ref(q, k, scale, diag_offset, with_col)
    return kernels.cross_lse_fwd(q, k, scale, *_split_offset(diag_offset), with_col)


@cross_lse.register_fake
def _(q, k, scale, diag_offset, with_col):
    acc = accumulation_dtype(q)
    return q.new_empty(q.shape[0], dtype=acc), q.new_empty(k.shape[0] if with_col else 0, dtype=acc)


@torch.library.custom_op("fastcl::cross_lse_backward", mutates_args=())
def cross_lse_backward(
    q: Tensor, k: Tensor, scale: Tensor, diag_offset: Optional[int],
    row_lse: Tensor, grad_row: Tensor, col_lse: Tensor, grad_col: Tensor, need_dk: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients (dq (M, D), dk (N, D) or (0,)) of sum(grad_row * row_lse + grad_col * col_lse)."""
    kernels = _kernels(q)
    if kernels is None:
        return cross_lse_backward_ref(
            q, k, scale, diag_offset, row_lse, grad_row, col_lse, grad_col, need_dk
        )
    offset, has_diag = _split_offset(diag_offset)
    return kernels.cross_lse_bwd(
        q, k, scale, offset, has_diag, row_lse, grad_row, col_lse, grad_col,
        col_lse.numel() > 0, need_dk,
    )


@cross_lse_backward.register_fake
def _(q, k, scale, diag_offset, row_lse, grad_row, col_lse, grad_col, need_dk):
    acc = accumulation_dtype(q)
    return q.new_empty(q.shape, dtype=acc), q.new_empty(k.shape if need_dk else (0,), dtype=acc)


def _cross_lse_setup(ctx, inputs, output):
    q, k, scale, diag_offset, _ = inputs
    ctx.diag_offset = diag_offset
    ctx.save_for_backward(q, k, scale, *output)


def _cross_lse_grad(ctx, grad_row, grad_col):
    q, k, scale, row_lse, col_lse = ctx.saved_tensors
    # An output that did not reach the loss has no gradient.
    grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
    grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
    dq, dk = cross_lse_backward(
        q, k, scale, ctx.diag_offset, row_lse, grad_row, col_lse, grad_col, ctx.needs_input_grad[1]
    )
    dscale = None
    if ctx.needs_input_grad[2]:
        # sum_i <dq_i, q_i> = scale * d(loss)/dscale: the logits are linear in scale.
        dscale = ((dq * q.to(dq.dtype)).sum() / scale).to(scale.dtype)
    dq = dq.to(q.dtype) if ctx.needs_input_grad[0] else None
    dk = dk.to(k.dtype) if ctx.needs_input_grad[1] else None
    return dq, dk, dscale, None, None


cross_lse.register_autograd(_cross_lse_grad, setup_context=_cross_lse_setup)


# ----------------------------------------------------------------------------------------------
# fastcl::bank_lse
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::bank_lse", mutates_args=())
def bank_lse(q: Tensor, bank: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """q: (M, D), bank: (K, D), scale: () -> (lse (M,), mean (M, D)). No gradient reaches bank."""
    kernels = _kernels(q)
    return bank_lse_ref(q, bank, scale) if kernels is None else kernels.bank_lse_fwd(q, bank, scale)


@bank_lse.register_fake
def _(q, bank, scale):
    acc = accumulation_dtype(q)
    return q.new_empty(q.shape[0], dtype=acc), q.new_empty(q.shape, dtype=acc)


def _bank_lse_setup(ctx, inputs, output):
    q, _, scale = inputs
    ctx.save_for_backward(q, scale, output[1])


def _bank_lse_grad(ctx, grad_lse, grad_mean):
    # mean is an auxiliary output for this backward: it is not differentiated.
    q, scale, mean = ctx.saved_tensors
    if grad_lse is None:
        grad_lse = torch.zeros(q.shape[0], dtype=mean.dtype, device=q.device)
    weighted = grad_lse.to(mean.dtype)[:, None] * mean  # (M, D) = sum_j g_i P_ij bank_j
    dq = (weighted * scale).to(q.dtype) if ctx.needs_input_grad[0] else None
    dscale = None
    if ctx.needs_input_grad[2]:
        dscale = (weighted * q.to(mean.dtype)).sum().to(scale.dtype)  # sum_ij g_i P_ij <q_i, k_j>
    return dq, None, dscale


bank_lse.register_autograd(_bank_lse_grad, setup_context=_bank_lse_setup)
