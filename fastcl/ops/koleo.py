"""KoLeo op family: DINOv2's Kozachenko-Leonenko regularizer (Sablayrolles et al. 2019), which
spreads a batch of features by pushing each one away from its nearest neighbour.

For x (B, D), exactly as DINOv2's KoLeoLoss (dinov2/loss/koleo_loss.py) computes it:

    n_i  = x_i / max(||x_i||, eps)                              F.normalize(x, eps=eps)
    j(i) = argmax_{j != i} n_i . n_j                            nearest neighbour, self excluded
    d_i  = ||n_i - n_j(i) + eps||                               nn.PairwiseDistance(2, eps=eps)
    loss = -1/B sum_i log(d_i + eps)

DINOv2 uses eps = 1e-8 in all three places (its forward's eps for the normalization and the log,
its PairwiseDistance's fixed 1e-8 for the distance, which adds eps to every component of the
difference); here one eps serves all three, so eps = 1e-8 is DINOv2's loss. Two departures, both
where DINOv2's code is ill-defined: self is excluded by index, not by DINOv2's diagonal filled with
-1 (which picks the row itself when every other score is -1, e.g. B = 2 with x_1 = -x_0), and B < 2
is an error (no neighbour exists).

Duplicates and ties. The eps inside the distance keeps d_i >= sqrt(D) eps > 0 for duplicate rows,
so the loss is finite (log(sqrt(D) eps + eps)) and so is the gradient. The neighbour is a
piecewise-constant choice: the gradient is that of the loss with the neighbours fixed at their
chosen values (exact wherever the nearest neighbour is unique, a one-sided derivative at a tie).
On a tie the lowest index wins, as torch.max does in DINOv2's code. Between duplicates d_i is tiny
and the gradient large (of order 1 / (B sqrt(D) eps) per component) unless two duplicates are each
other's neighbours, where the two terms cancel to first order.

* ``fastcl::koleo(x, eps)`` -> (loss () float32, neighbour (B,) int64): the nearest-neighbour
  search keeps only the running best per row (no (B, B) scores on the fast paths).
* ``fastcl::koleo_backward(x, neighbour, grad, eps)`` -> d x (B, D), O(B D) from the saved
  neighbours, with c_k = -grad / (B d_k (d_k + eps)) and r_k = n_k - n_j(k) + eps:
      d n_i = c_i r_i - sum_{k : j(k) = i} c_k r_k
      d x_i = (d n_i - n_i (n_i . d n_i)) / ||x_i||  if ||x_i|| >= eps,  else d n_i / eps.

x may be float32, bfloat16 or float16 (fp32 accumulation, fp32 loss, gradient in x's dtype) or
float64 (the reference). A NaN or infinite input makes the loss NaN.

Backends, by device through PyTorch's dispatcher (``register_backends``): the op bodies run the
references below (any device, float64), the CPU kernels csrc/koleo.cpp (tiled OpenMP search) and
the CUDA kernels kernels/koleo.py (tiled argmax over tl.dot tiles; backward for D <= 4096, wider
rows run the reference backward).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl import _checks
from fastcl._backend import accumulation_dtype, register_backends, triton_module


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, the (B, B) scores materialized. The op bodies.
# ----------------------------------------------------------------------------------------------
def _unit_rows(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(n, ||x||): F.normalize's rows and the norms, in the accumulation dtype."""
    x = x.to(accumulation_dtype(x))
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(eps), norm


def _differences(n: Tensor, neighbour: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(r (B, D) = n - n[neighbour] + eps, d (B,) = ||r||)."""
    r = n - n[neighbour] + eps
    return r, r.norm(dim=1)


def koleo_ref(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (B, D) -> (loss (), neighbour (B,) int64)."""
    n, _ = _unit_rows(x, eps)
    scores = n @ n.T
    scores.fill_diagonal_(float("-inf"))
    neighbour = scores.argmax(dim=1)
    _, d = _differences(n, neighbour, eps)
    return -torch.log(d + eps).mean(), neighbour


def koleo_backward_ref(x: Tensor, neighbour: Tensor, grad: Tensor, eps: float) -> Tensor:
    """d (grad * loss) / d x (B, D) in x's dtype, from the saved neighbours."""
    n, norm = _unit_rows(x, eps)
    r, d = _differences(n, neighbour, eps)
    c = -grad.to(n.dtype) / (x.shape[0] * d * (d + eps))
    weighted = c[:, None] * r
    dn = weighted.index_add(0, neighbour, weighted, alpha=-1)
    dx = torch.where(norm >= eps, (dn - n * (n * dn).sum(1, keepdim=True)) / norm, dn / eps)
    return dx.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# fastcl::koleo, fastcl::koleo_backward
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::koleo", mutates_args=())
def _koleo(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (B, D) -> (loss (), neighbour (B,) int64). Gradient flows to x."""
    return koleo_ref(x, eps)


register_backends(_koleo, "koleo", koleo_ref, "koleo_fwd")


@_koleo.register_fake
def _(x, eps):
    return (x.new_empty((), dtype=accumulation_dtype(x)),
            x.new_empty((x.shape[0],), dtype=torch.int64))


@torch.library.custom_op("fastcl::koleo_backward", mutates_args=())
def _koleo_backward(x: Tensor, neighbour: Tensor, grad: Tensor, eps: float) -> Tensor:
    """Gradient of grad * loss with respect to x: (B, D) in x's dtype."""
    return koleo_backward_ref(x, neighbour, grad, eps)


def _triton_fits(x: Tensor, *_) -> bool:
    return triton_module("koleo").fits(x)


register_backends(_koleo_backward, "koleo", koleo_backward_ref, "koleo_bwd",
                  triton_fits=_triton_fits)


@_koleo_backward.register_fake
def _(x, neighbour, grad, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _koleo_setup(ctx, inputs, output):
    x, eps = inputs
    _, neighbour = output
    ctx.mark_non_differentiable(neighbour)
    ctx.save_for_backward(x, neighbour)
    ctx.eps = eps


def _koleo_grad(ctx, grad, _grad_neighbour):
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None
    x, neighbour = ctx.saved_tensors
    return _koleo_backward(x, neighbour, grad, ctx.eps), None


_koleo.register_autograd(_koleo_grad, setup_context=_koleo_setup)


def koleo(x: Tensor, eps: float = 1e-8) -> Tensor:
    """DINOv2's KoLeo regularizer of the rows of x: -mean_i log(||n_i - n_j(i) + eps|| + eps), n the
    L2-normalized rows and j(i) the nearest other row (largest inner product, lowest index on a
    tie); eps = 1e-8 is DINOv2's KoLeoLoss exactly (see the module docstring).

    x: (B, D) with B >= 2, float32, bfloat16, float16 or float64. Returns the fp32 scalar (float64
    for float64 x); the gradient flows to x. DINOv2 applies it to the student's CLS features of each
    global crop separately, weighted 0.1.
    """
    _checks.embeddings("x", x)
    if x.shape[0] < 2:
        raise ValueError(f"x must have B >= 2 rows (each row needs a nearest neighbour), got "
                         f"shape {tuple(x.shape)}")
    _checks.positive_scalar("eps", eps, tensor=False)
    return _koleo(x, float(eps))[0]
