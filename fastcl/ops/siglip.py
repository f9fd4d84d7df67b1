"""SigLIP op family: the sigmoid loss of every pair of rows of two sets of embeddings, fused.

For x (M, D), y (N, D), a 0-dim scale and bias and the logits t_ij = scale <x_i, y_j> + bias, the
pairs with j - i == diag_offset are positive (z_ij = +1) and every other pair is negative
(z_ij = -1). Row i's loss is

    row_loss_i = sum_j -log sigmoid(z_ij t_ij) = sum_j softplus(u_ij),   u_ij = -z_ij t_ij,

computed as log1p(exp(u)) (exact for the tiny losses of late training, u << 0, where
"-log(sigmoid)" rounds to 0) and u + log1p(exp(-u)) for u > 0, so no logit overflows. The pairs
are independent (no normalization across a row as in a softmax), so the loss of a block of
columns is just added to that of the others: SigLIP over W ranks is this op on (local images,
each rank's texts) with diag_offset = rank * N for the own block's positives and an offset outside
(-M, N) (none of its pairs positive) for the others, and a ring exchange may call it block by block
as the texts travel. The backward weight of a pair is W_ij = g_i d softplus(u_ij) / d t_ij =
-z_ij g_i sigmoid(u_ij) for the upstream gradient g (M,), and

    dx = scale W y,   dy = scale W^T x,   dscale = sum_ij W_ij <x_i, y_j>,   dbias = sum_ij W_ij.

* ``fastcl::sigmoid_pairs(x, y, scale, bias, diag_offset)`` -> row_loss (M,).
* ``fastcl::sigmoid_pairs_backward(x, y, scale, bias, diag_offset, grad)`` -> (dx (M, D),
  dy (N, D), dscale (), dbias ()) for the upstream grad (M,): what a ring exchange calls on each
  travelling block (dy then travels with it).
* ``fastcl::sigmoid_pairs_sum(x, y, scale, bias, diag_offset, normalize)`` -> (loss (), dx, dy,
  dscale, dbias): the row losses summed, with their gradients computed in the same pass. A loss
  reduced to one scalar has an upstream gradient that only scales its gradients, so the forward
  forms each tile once (1 GEMM: loss terms and W with g = 1; 2 GEMMs: dx, dy) and backward only
  multiplies by that scalar: 3 GEMMs where sigmoid_pairs' forward + backward take 4. normalize:
  the rows of x and y are L2-normalized first (F.normalize), inside the op: only the inverse
  norms are formed (the kernels scale each logit by them: 16-bit rows are never rounded again
  after normalizing), and dx, dy are the gradients w.r.t. the raw rows (the normalization's
  Jacobian applied in place). The gradients it returns are saved for backward; they are not
  differentiable outputs.

``scale`` and ``bias`` are 0-dim tensors on the inputs' device, float32 (float64 for float64
inputs); both receive gradients. Outputs and gradients are computed in float32 (float64 for
float64 inputs, which run the reference) and rounded to the input dtype once. Neither the forward
nor what it saves for backward holds an M x N tensor: sigmoid_pairs' backward recomputes the
tiles from the inputs (saved as they are) and the scalars; sigmoid_pairs_sum saves only its
gradients (what the leaves receive).

Backends, chosen per device by PyTorch's dispatcher (``register_backends``, fastcl/_backend.py):
each op's body runs the reference below and is the default kernel for any device; the CPU kernel
runs csrc/siglip.cpp, the CUDA kernel kernels/siglip.py (sigmoid_pairs_sum as its forward and
backward passes, the normalization's Jacobian in PyTorch) for rows of D <= TRITON_MAX_DIM (wider rows
run the reference). float64 runs the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl._backend import accumulation_dtype, register_backends, rows_up_to
from fastcl.ops.contrastive import TRITON_MAX_DIM, exact_softplus


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, materialize the logits. The truth in tests.
# ----------------------------------------------------------------------------------------------
def _signed_logits_ref(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_offset: int):
    """(raw (M, N) = x y^T, positive (M, N) bool, u = -z (scale raw + bias)), in the
    accumulation dtype."""
    acc = accumulation_dtype(x)
    raw = x.to(acc) @ y.to(acc).T
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    cols = torch.arange(y.shape[0], device=x.device)[None, :]
    positive = cols - rows == diag_offset
    t = raw * scale.to(acc) + bias.to(acc)
    return raw, positive, torch.where(positive, -t, t)


def sigmoid_pairs_ref(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor,
                      diag_offset: int) -> Tensor:
    """x (M, D), y (N, D) -> row_loss (M,) = sum_j softplus(-z_ij t_ij)."""
    _, _, u = _signed_logits_ref(x, y, scale, bias, diag_offset)
    return exact_softplus(u).sum(1)


def sigmoid_pairs_backward_ref(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor,
                               diag_offset: int, grad: Tensor):
    """(dx (M, D), dy (N, D), dscale (), dbias ()) for the upstream gradient grad (M,)."""
    raw, positive, u = _signed_logits_ref(x, y, scale, bias, diag_offset)
    w = grad.to(raw.dtype)[:, None] * torch.sigmoid(u)
    w = torch.where(positive, -w, w)
    scale = scale.to(raw.dtype)
    dx = w @ y.to(raw.dtype) * scale
    dy = w.T @ x.to(raw.dtype) * scale
    return dx, dy, (w * raw).sum(), w.sum()


_NORM_EPS = 1e-12  # F.normalize's


def _inverse_norms(x: Tensor):
    """F.normalize's row scaling of x (M, D): (inverse norms (M,) in the accumulation dtype,
    kept (M,): rows whose norm exceeds eps, the others only scaled)."""
    norms = torch.linalg.vector_norm(x, dim=1, dtype=accumulation_dtype(x))
    return 1 / norms.clamp_min(_NORM_EPS), norms > _NORM_EPS


def _normalize_backward(x: Tensor, inv: Tensor, kept: Tensor, grad: Tensor) -> Tensor:
    """The gradient w.r.t. F.normalize(x) -> w.r.t. x: inv (g - x_hat <x_hat, g>)."""
    x_hat = x.to(grad.dtype) * inv[:, None]
    dots = torch.where(kept, (x_hat * grad).sum(1), 0)
    return (grad - x_hat * dots[:, None]) * inv[:, None]


def _sum_from_passes(fwd, bwd, x, y, scale, bias, diag_offset, normalize):
    """sigmoid_pairs_sum from a forward and a backward pass (upstream g = 1), the normalization
    around them: the CUDA form. With normalize, the passes get the raw rows and their fp32
    inverse norms (keywords inv_x, inv_y) and form the normalized logits themselves, so 16-bit
    rows are never rounded again after normalizing."""
    norms = {}
    if normalize:
        (inv_x, kept_x), (inv_y, kept_y) = _inverse_norms(x), _inverse_norms(y)
        norms = dict(inv_x=inv_x, inv_y=inv_y)
    loss = fwd(x, y, scale, bias, diag_offset, **norms).sum()
    ones = torch.ones(x.shape[0], dtype=loss.dtype, device=x.device)
    dx, dy, dscale, dbias = bwd(x, y, scale, bias, diag_offset, ones, **norms)
    if normalize:
        dx = _normalize_backward(x, inv_x, kept_x, dx)
        dy = _normalize_backward(y, inv_y, kept_y, dy)
    return loss, dx, dy, dscale, dbias


def _rows(x: Tensor, inv: Optional[Tensor]) -> Tensor:
    """x, or its rows scaled by inv (M,) in the accumulation dtype."""
    return x if inv is None else x.to(inv.dtype) * inv[:, None]


def sigmoid_pairs_sum_ref(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
                          normalize: bool):
    """(loss (), dx (M, D), dy (N, D), dscale (), dbias ()) of loss = sum of the row losses."""
    def fwd(x, y, scale, bias, diag_offset, inv_x=None, inv_y=None):
        return sigmoid_pairs_ref(_rows(x, inv_x), _rows(y, inv_y), scale, bias, diag_offset)

    def bwd(x, y, scale, bias, diag_offset, grad, inv_x=None, inv_y=None):
        return sigmoid_pairs_backward_ref(_rows(x, inv_x), _rows(y, inv_y), scale, bias,
                                          diag_offset, grad)

    return _sum_from_passes(fwd, bwd, x, y, scale, bias, diag_offset, normalize)


# ----------------------------------------------------------------------------------------------
# fastcl::sigmoid_pairs
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::sigmoid_pairs", mutates_args=())
def sigmoid_pairs(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_offset: int) -> Tensor:
    """x (M, D), y (N, D), scale (), bias () -> row_loss (M,); pairs j - i == diag_offset are the
    positives (none when that diagonal misses the (M, N) block)."""
    return sigmoid_pairs_ref(x, y, scale, bias, diag_offset)


register_backends(sigmoid_pairs, "siglip", sigmoid_pairs_ref, "sigmoid_pairs_fwd",
                  triton_fits=rows_up_to(TRITON_MAX_DIM))


@sigmoid_pairs.register_fake
def _(x, y, scale, bias, diag_offset):
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x))


@torch.library.custom_op("fastcl::sigmoid_pairs_backward", mutates_args=())
def sigmoid_pairs_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
                           grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (M, D), dy (N, D), dscale (), dbias ()) in the accumulation dtype, for the upstream
    gradient grad (M,) of the row losses."""
    return sigmoid_pairs_backward_ref(x, y, scale, bias, diag_offset, grad)


register_backends(sigmoid_pairs_backward, "siglip", sigmoid_pairs_backward_ref,
                  "sigmoid_pairs_bwd", triton_fits=rows_up_to(TRITON_MAX_DIM))


@sigmoid_pairs_backward.register_fake
def _(x, y, scale, bias, diag_offset, grad):
    acc = accumulation_dtype(x)
    return (x.new_empty(x.shape, dtype=acc), y.new_empty(y.shape, dtype=acc),
            x.new_empty((), dtype=acc), x.new_empty((), dtype=acc))


def _setup(ctx, inputs, output):
    x, y, scale, bias, diag_offset = inputs
    ctx.diag_offset = diag_offset
    ctx.save_for_backward(x, y, scale, bias)


def _grad(ctx, grad):
    x, y, scale, bias = ctx.saved_tensors
    dx, dy, dscale, dbias = sigmoid_pairs_backward(x, y, scale, bias, ctx.diag_offset, grad)
    need = ctx.needs_input_grad
    return (dx.to(x.dtype) if need[0] else None, dy.to(y.dtype) if need[1] else None,
            dscale.to(scale.dtype) if need[2] else None, dbias.to(bias.dtype) if need[3] else None,
            None)


sigmoid_pairs.register_autograd(_grad, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# fastcl::sigmoid_pairs_sum
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::sigmoid_pairs_sum", mutates_args=())
def sigmoid_pairs_sum(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, diag_offset: int,
                      normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (M, D), y (N, D), scale (), bias () -> (loss () = sum_i row_loss_i, and its gradients
    dx (M, D), dy (N, D), dscale (), dbias () in the accumulation dtype); rows L2-normalized first
    when normalize (dx, dy w.r.t. the raw rows)."""
    return sigmoid_pairs_sum_ref(x, y, scale, bias, diag_offset, normalize)


def _triton_sum(kernels, *args):
    return _sum_from_passes(kernels.sigmoid_pairs_fwd, kernels.sigmoid_pairs_bwd, *args)


register_backends(sigmoid_pairs_sum, "siglip", sigmoid_pairs_sum_ref, _triton_sum,
                  cpp_launch="sigmoid_pairs_sum", triton_fits=rows_up_to(TRITON_MAX_DIM))


@sigmoid_pairs_sum.register_fake
def _(x, y, scale, bias, diag_offset, normalize):
    acc = accumulation_dtype(x)
    return (x.new_empty((), dtype=acc), x.new_empty(x.shape, dtype=acc),
            y.new_empty(y.shape, dtype=acc), x.new_empty((), dtype=acc),
            x.new_empty((), dtype=acc))


def _sum_setup(ctx, inputs, output):
    x, y, scale, bias, _, _ = inputs
    ctx.dtypes = (x.dtype, y.dtype, scale.dtype, bias.dtype)
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero (M, D), (N, D) gradients for those outputs


def _sum_grad(ctx, grad, *_):
    """The gradients computed in the forward, times the upstream scalar grad."""
    need = ctx.needs_input_grad
    return tuple((g * grad).to(dtype) if needed else None
                 for g, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, need)) + (None, None)


sigmoid_pairs_sum.register_autograd(_sum_grad, setup_context=_sum_setup)
