"""DINO op family: the multi-crop teacher/student cross-entropy of DINO (and of every loss with its
shape: iBOT's [CLS] term, DINOv2's DINO head, SwAV-style swapped prediction with soft targets).

For S student crops, T teacher crops (the student's first T crops), B samples and K prototypes:

    p_t = softmax((teacher_t - center) * teacher_scale)          teacher_t: (B, K)
    q_s = softmax(student_s * student_scale)                     student_s: (B, K)
    loss = 1 / (n_pairs * B) * sum_b sum_t sum_{s != t} -sum_k p_t,k log q_s,k
    n_pairs = T * (S - 1)

* ``fastcl::dino_cross_entropy(student, teacher, center, student_scale, teacher_scale)`` ->
  (loss (), student_stats (2, S, B), teacher_stats (2, T, B)). One pass over K per sample with
  online statistics for every crop; nothing of size (S, T, B, K), (S, B, K) or per pair is
  materialized. The stats are what backward needs to rebuild both softmaxes in one pass:
  student_stats = [max_k x_s,k, log sum_k exp((x_s,k - max) * student_scale)] and
  teacher_stats = [max_k u_t,k, log sum_k exp((u_t,k - max) * teacher_scale)], u = teacher - center.
  Keeping the max in input units (not scaled, not folded into one lse) makes every exponent a
  difference of nearby fp32 numbers, exact enough at teacher_scale = 25 and logits of 1e3.
* ``fastcl::dino_cross_entropy_backward(..., student_stats, teacher_stats, grad)`` -> d student
  (S, B, K): with n_s = T - [s < T] pairs per student crop,
  d loss / d student_s = grad * student_scale / (n_pairs * B) * (n_s q_s - sum_{t != s} p_t).

Only the student gets a gradient (DINO's teacher is an EMA, its center a running mean); the scales
are 0-dim float32 tensors (1 / temperature) so that a temperature schedule does not recompile
torch.compile'd code. student and teacher share a dtype (float32, bfloat16, float16: fp32
accumulation, fp32 loss and stats, gradient in the input dtype; float64 runs the reference).

Backends, by device through PyTorch's dispatcher (``register_backends``): the op bodies run the
references below, the default on any device and for float64; the CPU kernels csrc/dino.cpp and the
CUDA kernels kernels/dino.py (up to 16 student and 4 teacher crops; more run the reference).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl._backend import accumulation_dtype, register_backends, triton_module


def num_pairs(s: int, t: int) -> int:
    """Number of (teacher t, student s != t) pairs: each teacher crop is also a student crop."""
    return t * (s - 1)


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, materializing both softmaxes. The truth in tests.
# ----------------------------------------------------------------------------------------------
def _row_stats(x: Tensor, scale: Tensor) -> Tensor:
    """x: (R, B, K) -> (2, R, B): [max_k x, log sum_k exp((x - max) * scale)]."""
    peak = x.amax(dim=-1)
    return torch.stack([peak, torch.logsumexp((x - peak[..., None]) * scale, dim=-1)])


def _softmax_from_stats(x: Tensor, scale: Tensor, stats: Tensor) -> Tensor:
    """The softmax of x * scale over K, x: (R, B, K), rebuilt from its stats (2, R, B)."""
    return torch.exp((x - stats[0][..., None]) * scale - stats[1][..., None])


def dino_cross_entropy_ref(
    student: Tensor, teacher: Tensor, center: Tensor, student_scale: Tensor, teacher_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """student (S, B, K), teacher (T, B, K), center (K,), scales () ->
    (loss (), student_stats (2, S, B), teacher_stats (2, T, B))."""
    acc = accumulation_dtype(student)
    x, u = student.to(acc), teacher.to(acc) - center.to(acc)
    student_scale, teacher_scale = student_scale.to(acc), teacher_scale.to(acc)
    s, t, b = x.shape[0], u.shape[0], x.shape[1]
    student_stats, teacher_stats = _row_stats(x, student_scale), _row_stats(u, teacher_scale)
    p = _softmax_from_stats(u, teacher_scale, teacher_stats)
    log_q = (x - student_stats[0][..., None]) * student_scale - student_stats[1][..., None]
    ce = -torch.einsum("tbk,sbk->ts", p, log_q)  # (T, S), summed over b
    loss = (ce.sum() - ce.diagonal().sum()) / (num_pairs(s, t) * b)
    return loss, student_stats, teacher_stats


def dino_cross_entropy_backward_ref(
    student: Tensor, teacher: Tensor, center: Tensor, student_scale: Tensor, teacher_scale: Tensor,
    student_stats: Tensor, teacher_stats: Tensor, grad: Tensor,
) -> Tensor:
    """d (grad * loss) / d student (S, B, K) in student's dtype, computed in the accumulation
    dtype from the saved stats."""
    acc = accumulation_dtype(student)
    x, u = student.to(acc), teacher.to(acc) - center.to(acc)
    student_scale = student_scale.to(acc)
    s, t, b = x.shape[0], u.shape[0], x.shape[1]
    q = _softmax_from_stats(x, student_scale, student_stats.to(acc))
    p = _softmax_from_stats(u, teacher_scale.to(acc), teacher_stats.to(acc))
    # Every teacher crop pairs with every student crop but its own: n_s = T - [s < T].
    own = torch.zeros_like(q)
    own[:t] = p
    n_s = torch.full((s, 1, 1), t, dtype=acc, device=x.device)
    n_s[:t] -= 1
    coef = grad.to(acc) * student_scale / (num_pairs(s, t) * b)
    return (coef * (n_s * q - (p.sum(0) - own))).to(student.dtype)


# ----------------------------------------------------------------------------------------------
# fastcl::dino_cross_entropy
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::dino_cross_entropy", mutates_args=())
def dino_cross_entropy(
    student: Tensor, teacher: Tensor, center: Tensor, student_scale: Tensor, teacher_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """student (S, B, K), teacher (T, B, K), center (K,), scales () float32 ->
    (loss (), student_stats (2, S, B), teacher_stats (2, T, B)). Gradient flows to student only."""
    return dino_cross_entropy_ref(student, teacher, center, student_scale, teacher_scale)


def _triton_fits(student: Tensor, teacher: Tensor, *_) -> bool:
    """The Triton kernels pad the crops to a few compiled buckets (kernels/dino.py CONFIGS)."""
    return triton_module("dino").fits(student.shape[0], teacher.shape[0])


register_backends(dino_cross_entropy, "dino", dino_cross_entropy_ref, "dino_cross_entropy_fwd",
                  triton_fits=_triton_fits)


def fake_outputs(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Empty (loss (), student_stats (2, S, B), teacher_stats (2, T, B)) for student (S, B, ...)
    and teacher (T, B, ...): the fake of the family's forward ops."""
    acc = accumulation_dtype(student)
    s, b = student.shape[:2]
    return (student.new_empty((), dtype=acc), student.new_empty((2, s, b), dtype=acc),
            student.new_empty((2, teacher.shape[0], b), dtype=acc))


@dino_cross_entropy.register_fake
def _(student, teacher, center, student_scale, teacher_scale):
    return fake_outputs(student, teacher)


@torch.library.custom_op("fastcl::dino_cross_entropy_backward", mutates_args=())
def dino_cross_entropy_backward(
    student: Tensor, teacher: Tensor, center: Tensor, student_scale: Tensor, teacher_scale: Tensor,
    student_stats: Tensor, teacher_stats: Tensor, grad: Tensor,
) -> Tensor:
    """Gradient of grad * loss with respect to student: (S, B, K) in student's dtype."""
    return dino_cross_entropy_backward_ref(student, teacher, center, student_scale, teacher_scale,
                                           student_stats, teacher_stats, grad)


register_backends(dino_cross_entropy_backward, "dino", dino_cross_entropy_backward_ref,
                  "dino_cross_entropy_bwd", triton_fits=_triton_fits)


@dino_cross_entropy_backward.register_fake
def _(student, teacher, center, student_scale, teacher_scale, student_stats, teacher_stats, grad):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _dino_cross_entropy_setup(ctx, inputs, output):
    student, teacher, center, student_scale, teacher_scale = inputs
    _, student_stats, teacher_stats = output
    # The stats are auxiliary outputs for this backward, not differentiable results.
    ctx.mark_non_differentiable(student_stats, teacher_stats)
    ctx.save_for_backward(student, teacher, center, student_scale, teacher_scale, student_stats,
                          teacher_stats)


def _dino_cross_entropy_grad(ctx, grad, _grad_student_stats, _grad_teacher_stats):
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    dstudent = dino_cross_entropy_backward(*ctx.saved_tensors, grad)
    return dstudent, None, None, None, None


dino_cross_entropy.register_autograd(_dino_cross_entropy_grad,
                                     setup_context=_dino_cross_entropy_setup)
