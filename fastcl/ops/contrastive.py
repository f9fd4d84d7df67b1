"""Contrastive op family: the per-anchor loss of every InfoNCE-style loss, fused.

For logits s_ij = scale <a_i, b_j> over a (M, D) and b (N, D), row and column labels, and the
pairs j - i == diag_offset left out (the self-pairs of a Gram matrix), an anchor's positives
P_i are the kept pairs with b_labels[j] == a_labels[i] and its negatives N_i the other kept
pairs. Its loss is

    loss_i = log sum_{j in P_i + N_i} exp(s_ij) - (1 / |P_i|) sum_{j in P_i} s_ij

(the second term is 0 when P_i is empty, so the loss is then the plain log-sum-exp). NT-Xent,
InfoNCE with in-batch negatives, symmetric CLIP / CMC and SupCon are all this with different
labels. The loss is never formed as "lse - positive" (late in training both are ~1/T and their
difference ~1e-6 or less): the ops keep separate statistics of the positives and the negatives,

    stats (4, M) = [lse_neg, lse_pos, sum_pos, count]   (log-sum-exp over N_i and over P_i, the sum
                                                          of the positive logits and |P_i|)
    loss_i = (lse_pos - sum_pos / count) + softplus(lse_neg - lse_pos),

which is exactly 0 + log1p(sum_n exp(s_in - s_ip)) for a single positive. The backward weight of
a pair is W_ij = g_i exp(s_ij - lse_i) for a negative and g_i ((q_ij - 1/|P_i|) - q_ij r_i) for a
positive, with q_ij = exp(s_ij - lse_pos_i) (exactly 1 for a single positive) and
r_i = sigmoid(lse_neg_i - lse_pos_i) the negatives' share of the softmax: the small gradient of a
near-duplicate positive is formed from small terms, in fp32, and rounded once at the end.

* ``fastcl::gram_contrastive(u, labels, scale)``: a = b = u (M, D), self-pairs left out ->
  (loss (M,), stats (4, M)). Only tiles on and above the diagonal are visited.
* ``fastcl::cross_contrastive(q, k, q_labels, k_labels, scale, diag_offset, with_col)``: ->
  (row loss (M,), column loss (N,) or (0,), row stats (4, M), column stats (4, N) or (4, 0)); the
  column losses are those of the keys as anchors against the queries (CLIP's second direction).
* ``fastcl::bank_lse(q, bank, scale)``: q (M, D), bank (K, D) -> (lse (M,), mean (M, D)), the
  row lse over a bank of negatives (MoCo queue, memory bank) that gets no gradient, plus
  mean_i = sum_j softmax(s_i)_j bank_j, which is the whole backward (dq_i = scale g_i mean_i):
  the bank is read once, in forward.

``scale`` is a 0-dim tensor (1 / temperature) on the inputs' device, float32 (float64 for float64
inputs); it receives a gradient, computed for free from the input gradients (the logits are
linear in scale). Outputs and gradients are computed in float32 (float64 for float64 inputs,
which run the reference) and rounded to the input dtype once.

Backends, chosen per device by PyTorch's dispatcher (``register_backends``, fastcl/_backend.py):
each op's body runs the reference below and is the default kernel for any device; the CPU kernel
runs csrc/contrastive.cpp, the CUDA kernel kernels/contrastive.py for rows of D <= TRITON_MAX_DIM
(the tiles keep whole rows in registers; wider rows run the reference). float64 runs the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl._backend import accumulation_dtype, register_backends, rows_up_to

# The Triton kernels keep a whole row of features in registers; wider rows use the reference.
TRITON_MAX_DIM = 1024


# ----------------------------------------------------------------------------------------------
# Loss and backward coefficients from the statistics (every backend)
# ----------------------------------------------------------------------------------------------
def exact_softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)), exact at every x (torch's softplus returns x above a threshold), with the
    gradient sigmoid(x) everywhere, 1/2 at x = 0 included."""
    return torch.logaddexp(x, torch.zeros_like(x))


def loss_from_stats(stats: Tensor) -> Tensor:
    """stats (4, n) = [lse_neg, lse_pos, sum_pos, count] -> loss (n,)."""
    lse_neg, lse_pos, sum_pos, count = stats
    with_pos = (lse_pos - sum_pos / count.clamp(min=1)) + exact_softplus(lse_neg - lse_pos)
    return torch.where(count > 0, with_pos, lse_neg)


def backward_coefficients(stats: Tensor, grad: Tensor) -> Tensor:
    """stats (4, n), grad (n,) -> coef (5, n) = [g, lse, lse_pos, 1 / count (0 if none), r]:
    all the backward kernels read per row (see the module docstring for the weights)."""
    lse_neg, lse_pos, _, count = stats
    lse = torch.logaddexp(lse_neg, lse_pos)
    # r = 1 without positives (all the mass is on negatives), 0 without negatives.
    share = torch.where(count > 0, torch.sigmoid(lse_neg - lse_pos), 1.0)
    inv_count = torch.where(count > 0, 1.0 / count.clamp(min=1), 0.0)
    return torch.stack([grad.to(stats.dtype), lse, lse_pos, inv_count, share])


def negatives_lse_coefficients(stats: Tensor, grad: Tensor) -> Tensor:
    """stats (4, n), grad (n,) -> coef (5, n) giving the backward of sum_i grad_i lse_neg_i (the
    log-sum-exp over the negatives alone): negatives weighted g exp(s - lse_neg), positives by
    (q - 1 / count) - q share = 0 with 1 / count = 0 and share = 1."""
    lse_neg, lse_pos = stats[0], stats[1]
    return torch.stack([grad.to(stats.dtype), lse_neg, lse_pos, torch.zeros_like(lse_neg),
                        torch.ones_like(lse_neg)])


def gram_scale_grad(du: Tensor, u: Tensor, scale: Tensor) -> Tensor:
    """d(loss)/d scale from a Gram backward's du (M, D): sum_i <du_i, u_i> / (2 scale), since the
    logits are linear in scale and W + W^T is symmetric."""
    return ((du * u.to(du.dtype)).sum() / (2 * scale.to(du.dtype))).to(scale.dtype)


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, materialize the similarity matrix. The truth in tests.
# ----------------------------------------------------------------------------------------------
def _pair_masks(a_labels: Tensor, b_labels: Tensor, diag_offset: Optional[int]):
    """(positive, negative) (m, n) bool masks; excluded pairs are in neither."""
    positive = a_labels[:, None] == b_labels[None, :]
    kept = torch.ones_like(positive)
    if diag_offset is not None:
        rows = torch.arange(a_labels.shape[0], device=a_labels.device)[:, None]
        cols = torch.arange(b_labels.shape[0], device=a_labels.device)[None, :]
        kept = cols - rows != diag_offset
    return positive & kept, ~positive & kept


def _logits_ref(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    acc = accumulation_dtype(a)
    return (a.to(acc) @ b.to(acc).T) * scale.to(acc)


def _stats_ref(s: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """Row statistics (4, m) of the logits s (m, n)."""
    lse_neg = torch.logsumexp(s.masked_fill(~negative, float("-inf")), dim=1)
    lse_pos = torch.logsumexp(s.masked_fill(~positive, float("-inf")), dim=1)
    sum_pos = torch.where(positive, s, 0.0).sum(1)
    return torch.stack([lse_neg, lse_pos, sum_pos, positive.sum(1).to(s.dtype)])


def _weights_ref(s: Tensor, positive: Tensor, negative: Tensor, coef: Tensor) -> Tensor:
    """W (m, n) of the rows of s with coefficients coef (5, m)."""
    grad, lse, lse_pos, inv_count, share = (c[:, None] for c in coef)
    single = inv_count == 1
    q = torch.where(single, 1.0, torch.exp(s - torch.where(single, 0.0, lse_pos)))
    w_pos = (q - inv_count) - q * share
    w = torch.where(negative, torch.exp(s - lse), 0.0) + torch.where(positive, w_pos, 0.0)
    return grad * w


def cross_contrastive_ref(
    q: Tensor, k: Tensor, q_labels: Tensor, k_labels: Tensor, scale: Tensor,
    diag_offset: Optional[int], with_col: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (M, D), k (N, D) -> (loss (M,), col loss (N,) or (0,), stats (4, M), col stats)."""
    s = _logits_ref(q, k, scale)
    positive, negative = _pair_masks(q_labels, k_labels, diag_offset)
    stats = _stats_ref(s, positive, negative)
    col_stats = _stats_ref(s.T, positive.T, negative.T) if with_col else s.new_empty(4, 0)
    return loss_from_stats(stats), loss_from_stats(col_stats), stats, col_stats


def cross_contrastive_backward_ref(
    q: Tensor, k: Tensor, q_labels: Tensor, k_labels: Tensor, scale: Tensor,
    diag_offset: Optional[int], coef: Tensor, col_coef: Tensor, need_dk: bool,
) -> tuple[Tensor, Tensor]:
    """(dq (M, D), dk (N, D) or (0,)) for row coefficients (5, M), column ones (5, N) or (5, 0)."""
    s = _logits_ref(q, k, scale)
    positive, negative = _pair_masks(q_labels, k_labels, diag_offset)
    w = _weights_ref(s, positive, negative, coef)
    if col_coef.shape[1]:
        w = w + _weights_ref(s.T, positive.T, negative.T, col_coef).T
    scale = scale.to(s.dtype)
    dq = w @ k.to(s.dtype) * scale
    dk = w.T @ q.to(s.dtype) * scale if need_dk else dq.new_empty(0)
    return dq, dk


def gram_contrastive_ref(u: Tensor, labels: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """u (M, D), labels (M,) -> (loss (M,), stats (4, M)), self-pairs left out."""
    loss, _, stats, _ = cross_contrastive_ref(u, u, labels, labels, scale, 0, False)
    return loss, stats


def gram_contrastive_backward_ref(u: Tensor, labels: Tensor, scale: Tensor, coef: Tensor) -> Tensor:
    """du (M, D) = scale (W + W^T) u."""
    dq, dk = cross_contrastive_backward_ref(u, u, labels, labels, scale, 0, coef, coef[:, :0], True)
    return dq + dk


def bank_lse_ref(q: Tensor, bank: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """q: (M, D), bank: (K, D) -> (lse (M,), mean (M, D) = softmax(s) @ bank)."""
    s = _logits_ref(q, bank, scale)
    return torch.logsumexp(s, dim=1), torch.softmax(s, dim=1) @ bank.to(s.dtype)


# ----------------------------------------------------------------------------------------------
# Kernel launches, the same on both backends (fastcl._C and fastcl.kernels.contrastive)
# ----------------------------------------------------------------------------------------------
def _split_offset(diag_offset: Optional[int]) -> tuple[int, bool]:
    return (0, False) if diag_offset is None else (diag_offset, True)


def _gram_contrastive_launch(kernels, u, labels, scale):
    stats = kernels.gram_stats_fwd(u, labels, scale)
    return loss_from_stats(stats), stats


def _cross_contrastive_launch(kernels, q, k, q_labels, k_labels, scale, diag_offset, with_col):
    stats, col_stats = kernels.cross_stats_fwd(
        q, k, q_labels, k_labels, scale, *_split_offset(diag_offset), with_col
    )
    return loss_from_stats(stats), loss_from_stats(col_stats), stats, col_stats


def _cross_contrastive_backward_launch(kernels, q, k, q_labels, k_labels, scale, diag_offset,
                                       coef, col_coef, need_dk):
    return kernels.cross_stats_bwd(
        q, k, q_labels, k_labels, scale, *_split_offset(diag_offset), coef, col_coef, need_dk
    )


# ----------------------------------------------------------------------------------------------
# fastcl::gram_contrastive
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::gram_contrastive", mutates_args=())
def gram_contrastive(u: Tensor, labels: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """u (M, D), labels (M,) int64, scale () -> (loss (M,), stats (4, M)), self-pairs left out."""
    return gram_contrastive_ref(u, labels, scale)


register_backends(gram_contrastive, "contrastive", gram_contrastive_ref, _gram_contrastive_launch,
                  triton_fits=rows_up_to(TRITON_MAX_DIM))


@gram_contrastive.register_fake
def _(u, labels, scale):
    acc = accumulation_dtype(u)
    return u.new_empty(u.shape[0], dtype=acc), u.new_empty(4, u.shape[0], dtype=acc)


@torch.library.custom_op("fastcl::gram_contrastive_backward", mutates_args=())
def gram_contrastive_backward(u: Tensor, labels: Tensor, scale: Tensor, coef: Tensor) -> Tensor:
    """du (M, D) in the accumulation dtype, for backward coefficients coef (5, M)."""
    return gram_contrastive_backward_ref(u, labels, scale, coef)


register_backends(gram_contrastive_backward, "contrastive", gram_contrastive_backward_ref,
                  "gram_stats_bwd", triton_fits=rows_up_to(TRITON_MAX_DIM))


@gram_contrastive_backward.register_fake
def _(u, labels, scale, coef):
    return u.new_empty(u.shape, dtype=accumulation_dtype(u))


def _gram_setup(ctx, inputs, output):
    u, labels, scale = inputs
    ctx.save_for_backward(u, labels, scale, output[1])


def _gram_grad(ctx, grad, _grad_stats):
    u, labels, scale, stats = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(stats[0])
    du = gram_contrastive_backward(u, labels, scale, backward_coefficients(stats, grad))
    dscale = gram_scale_grad(du, u, scale) if ctx.needs_input_grad[2] else None
    return du.to(u.dtype), None, dscale


gram_contrastive.register_autograd(_gram_grad, setup_context=_gram_setup)


# ----------------------------------------------------------------------------------------------
# fastcl::cross_contrastive
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::cross_contrastive", mutates_args=())
def cross_contrastive(
    q: Tensor, k: Tensor, q_labels: Tensor, k_labels: Tensor, scale: Tensor,
    diag_offset: Optional[int], with_col: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (M, D), k (N, D), labels (M,), (N,) int64, scale () -> (loss (M,), col loss (N,) or (0,),
    stats (4, M), col stats (4, N) or (4, 0)); pairs j - i == diag_offset left out."""
    return cross_contrastive_ref(q, k, q_labels, k_labels, scale, diag_offset, with_col)


register_backends(cross_contrastive, "contrastive", cross_contrastive_ref,
                  _cross_contrastive_launch, triton_fits=rows_up_to(TRITON_MAX_DIM))


@cross_contrastive.register_fake
def _(q, k, q_labels, k_labels, scale, diag_offset, with_col):
    acc = accumulation_dtype(q)
    n = k.shape[0] if with_col else 0
    return (q.new_empty(q.shape[0], dtype=acc), q.new_empty(n, dtype=acc),
            q.new_empty(4, q.shape[0], dtype=acc), q.new_empty(4, n, dtype=acc))


@torch.library.custom_op("fastcl::cross_contrastive_backward", mutates_args=())
def cross_contrastive_backward(
    q: Tensor, k: Tensor, q_labels: Tensor, k_labels: Tensor, scale: Tensor,
    diag_offset: Optional[int], coef: Tensor, col_coef: Tensor, need_dk: bool,
) -> tuple[Tensor, Tensor]:
    """(dq (M, D), dk (N, D) or (0,)) in the accumulation dtype, for row coefficients (5, M) and
    column coefficients (5, N) (or (5, 0): the column losses did not reach the loss)."""
    return cross_contrastive_backward_ref(
        q, k, q_labels, k_labels, scale, diag_offset, coef, col_coef, need_dk
    )


register_backends(cross_contrastive_backward, "contrastive", cross_contrastive_backward_ref,
                  _cross_contrastive_backward_launch, triton_fits=rows_up_to(TRITON_MAX_DIM))


@cross_contrastive_backward.register_fake
def _(q, k, q_labels, k_labels, scale, diag_offset, coef, col_coef, need_dk):
    acc = accumulation_dtype(q)
    return q.new_empty(q.shape, dtype=acc), q.new_empty(k.shape if need_dk else (0,), dtype=acc)


def _cross_setup(ctx, inputs, output):
    q, k, q_labels, k_labels, scale, diag_offset, _ = inputs
    ctx.diag_offset = diag_offset
    ctx.save_for_backward(q, k, q_labels, k_labels, scale, output[2], output[3])


def _cross_grad(ctx, grad, grad_col, _grad_stats, _grad_col_stats):
    q, k, q_labels, k_labels, scale, stats, col_stats = ctx.saved_tensors
    grad = torch.zeros_like(stats[0]) if grad is None else grad
    # Column losses that did not reach the loss cost nothing in backward.
    col_coef = (col_stats.new_empty(5, 0) if grad_col is None or not col_stats.shape[1]
                else backward_coefficients(col_stats, grad_col))
    dq, dk = cross_contrastive_backward(
        q, k, q_labels, k_labels, scale, ctx.diag_offset, backward_coefficients(stats, grad),
        col_coef, ctx.needs_input_grad[1],
    )
    dscale = None
    if ctx.needs_input_grad[4]:
        # sum_i <dq_i, q_i> = scale * d(loss)/dscale: the logits are linear in scale.
        dscale = ((dq * q.to(dq.dtype)).sum() / scale.to(dq.dtype)).to(scale.dtype)
    dq = dq.to(q.dtype) if ctx.needs_input_grad[0] else None
    dk = dk.to(k.dtype) if ctx.needs_input_grad[1] else None
    return dq, dk, None, None, dscale, None, None


cross_contrastive.register_autograd(_cross_grad, setup_context=_cross_setup)


# ----------------------------------------------------------------------------------------------
# fastcl::bank_lse
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::bank_lse", mutates_args=())
def bank_lse(q: Tensor, bank: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """q: (M, D), bank: (K, D), scale: () -> (lse (M,), mean (M, D)). No gradient reaches bank."""
    return bank_lse_ref(q, bank, scale)


register_backends(bank_lse, "contrastive", bank_lse_ref, "bank_lse_fwd",
                  triton_fits=rows_up_to(TRITON_MAX_DIM))


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
