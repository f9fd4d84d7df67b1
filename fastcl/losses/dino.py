"""DINO loss (Caron et al. 2021): multi-crop cross-entropy between the centered, sharpened teacher
softmax of the global crops and the student softmax of every other crop, as a function and as a
drop-in ``nn.Module`` that keeps the center and the teacher-temperature warm-up. DINOv2's
Sinkhorn-Knopp centering of the teacher (``dino_loss_sinkhorn``, ``DINOLoss(centering=
"sinkhorn")``) replaces the running center by a balanced assignment of each batch.

The cross-entropy comes from the fused op fastcl::dino_cross_entropy: one pass over the prototype
axis per sample, no (crops, B, K) softmax or per-pair product in memory, only the student gets a
gradient. Inputs may be float32, bfloat16 or float16 (fp32 accumulation, fp32 loss, gradient in the
input dtype) or float64 (computed by the reference, for testing).
"""
from __future__ import annotations

from numbers import Integral
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastcl import _checks
from fastcl.distributed import world
from fastcl.ops import dino as ops
from fastcl.ops.sinkhorn import sinkhorn

CENTERINGS = ("ema", "sinkhorn")

Temperature = Union[float, Tensor]


def _check_crops(student: Tensor, teacher: Tensor, last: str = "K") -> None:
    """student (S, B, K) and teacher (T, B, K) logits (or features, last="H"), T <= S, S >= 2."""
    _checks.embeddings("student", student, ndim=3)
    _checks.embeddings("teacher", teacher, ndim=3)
    _checks.same_dtype(student=student, teacher=teacher)
    _checks.same_device(student=student, teacher=teacher)
    s, b, k = student.shape
    t = teacher.shape[0]
    if t > s:
        raise ValueError(f"teacher has T = {t} crops but student only S = {s}: the teacher's crops "
                         f"must be the student's first T crops (T <= S)")
    if s < 2:
        raise ValueError(f"student needs S >= 2 crops so that every teacher crop has a student "
                         f"crop to pair with, got shape {tuple(student.shape)}")
    if teacher.shape[1:] != (b, k):
        raise ValueError(f"teacher must have shape (T, B, {last}) with B = {b}, {last} = {k} as "
                         f"student, got {tuple(teacher.shape)}")


def _check_inputs(student: Tensor, teacher: Tensor, center: Tensor) -> None:
    _check_crops(student, teacher)
    k = student.shape[-1]
    if not isinstance(center, Tensor):
        raise TypeError(f"center must be a torch.Tensor, got {type(center).__name__}")
    if center.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"center must be a floating tensor, got {center.dtype}")
    if center.shape not in ((k,), (1, k)):
        raise ValueError(f"center must have shape ({k},) or (1, {k}), got {tuple(center.shape)}")
    _checks.same_device(student=student, center=center)


def dino_loss(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
) -> Tensor:
    """DINO's cross-entropy, averaged over the (teacher crop t, student crop s != t) pairs.

    student: (S, B, K) logits of S crops; teacher: (T, B, K) logits of the T global crops, which are
    the student's first T crops (T <= S); center: (K,) or (1, K). Returns the fp32 scalar
    mean over pairs of  mean_b -sum_k softmax((teacher_t - center) / teacher_temp)_k
    * log_softmax(student_s / student_temp)_k.
    Only student gets a gradient (teacher and center are detached). The temperatures are floats or
    0-dim tensors, never differentiated. Equals fastcl.formulas.dino_loss (the official code's
    formula) and lightly's DINOLoss.
    """
    _check_inputs(student, teacher, center)
    student_scale = _checks.inverse_temperature(student_temp, student, "student_temp").detach()
    teacher_scale = _checks.inverse_temperature(teacher_temp, student, "teacher_temp").detach()
    center = center.detach().reshape(-1)
    return ops.dino_cross_entropy(student, teacher.detach(), center, student_scale,
                                  teacher_scale)[0]


def dino_loss_sinkhorn(
    student: Tensor,
    teacher: Tensor,
    student_temp: Temperature = 0.1,
    teacher_temp: float = 0.04,
    iterations: int = 3,
) -> Tensor:
    """DINO's cross-entropy with DINOv2's Sinkhorn-Knopp centering of the teacher.

    student: (S, B, K), teacher: (T, B, K) as :func:`dino_loss`. The teacher targets are the codes
    of SwAV's Sinkhorn-Knopp (fastcl.sinkhorn, epsilon = teacher_temp, `iterations` steps) over all
    T * B teacher rows at once, all ranks together under torch.distributed (DINOv2's
    sinkhorn_knopp_teacher): every prototype gets an equal share of the batch, so no running
    center is needed. Returns the fp32 mean over pairs of  mean_b -sum_k codes_t,k
    * log_softmax(student_s / student_temp)_k; only student gets a gradient.
    """
    _check_crops(student, teacher)
    if not isinstance(teacher_temp, (int, float)) or isinstance(teacher_temp, bool):
        raise TypeError(f"teacher_temp must be a float (Sinkhorn's epsilon), got "
                        f"{type(teacher_temp).__name__}")
    t, b, k = teacher.shape
    codes = sinkhorn(teacher.detach().reshape(t * b, k), epsilon=float(teacher_temp),
                     iterations=iterations, gather=True)
    # The op's teacher softmax of log(codes) at temperature 1 is the codes themselves (rows sum
    # to 1); the floor keeps underflowed codes finite. 16-bit students are upcast: the log-codes
    # would lose their precision in 16 bits.
    dtype = torch.promote_types(student.dtype, codes.dtype)
    targets = codes.clamp_min(torch.finfo(codes.dtype).tiny).log().view(t, b, k).to(dtype)
    return dino_loss(student.to(dtype), targets, targets.new_zeros(k), student_temp, 1.0)


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float,
                          warmup_teacher_temp_epochs: int, num_epochs: int) -> np.ndarray:
    """The official DINO schedule: a linear warm-up over the first epochs, then constant."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(num_epochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


class DINOLoss(nn.Module):
    """DINO's loss with its state: the teacher center (buffer ``center``, (1, out_dim), updated
    after every call) and the teacher-temperature warm-up.

        loss_fn = DINOLoss(65536, warmup_teacher_temp=0.04, teacher_temp=0.07,
                           warmup_teacher_temp_epochs=30, num_epochs=100)
        loss = loss_fn(student, teacher, epoch)   # student (S, B, K), teacher (T, B, K)

    The teacher temperature at `epoch` is the official np.linspace schedule (warmup_teacher_temp
    to teacher_temp over warmup_teacher_temp_epochs, then teacher_temp); epoch=None uses
    teacher_temp, as lightly does. num_epochs=None leaves epochs unbounded (the official code's
    schedule array has num_epochs entries). After the loss, center <- m * center + (1 - m) *
    the mean of the teacher's T * B rows, all-reduced over ranks when torch.distributed is
    initialized (computed in fp32, where the official code sums in the teacher's dtype).

    centering="sinkhorn" (DINOv2's option) centers the teacher by Sinkhorn-Knopp instead
    (:func:`dino_loss_sinkhorn`, `sinkhorn_iterations` steps, epsilon = the teacher temperature
    of the epoch); the center buffer is then neither used nor updated.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
                 num_epochs: Optional[int] = None, center_momentum: float = 0.9,
                 centering: str = "ema", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        if not isinstance(sinkhorn_iterations, Integral) or sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be an integer >= 1, got "
                             f"{sinkhorn_iterations!r}")
        self.centering, self.sinkhorn_iterations = centering, int(sinkhorn_iterations)
        if not isinstance(out_dim, Integral) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive integer, got {out_dim!r}")
        for name, value in [("student_temp", student_temp), ("teacher_temp", teacher_temp),
                            ("warmup_teacher_temp", warmup_teacher_temp)]:
            _checks.positive_scalar(name, value)
        if not isinstance(warmup_teacher_temp_epochs, Integral) or warmup_teacher_temp_epochs < 0:
            raise ValueError(f"warmup_teacher_temp_epochs must be an integer >= 0, got "
                             f"{warmup_teacher_temp_epochs!r}")
        if num_epochs is not None and (not isinstance(num_epochs, Integral)
                                       or num_epochs < warmup_teacher_temp_epochs):
            raise ValueError(f"num_epochs must be an integer >= warmup_teacher_temp_epochs = "
                             f"{warmup_teacher_temp_epochs}, got {num_epochs!r}")
        _checks.unit_interval("center_momentum", center_momentum)
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.num_epochs, self.center_momentum = num_epochs, center_momentum
        # The warm-up part of the official schedule; later epochs use teacher_temp.
        self.warmup_temps = tuple(teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
            warmup_teacher_temp_epochs).tolist())
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch: Optional[int] = None) -> float:
        """The teacher temperature at `epoch` (teacher_temp when epoch is None)."""
        if epoch is None:
            return self.teacher_temp
        if not isinstance(epoch, Integral) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if self.num_epochs is not None and epoch >= self.num_epochs:
            raise ValueError(f"epoch must be < num_epochs = {self.num_epochs}, got {epoch}")
        return self.warmup_temps[epoch] if epoch < len(self.warmup_temps) else self.teacher_temp

    def forward(self, student: Tensor, teacher: Tensor, epoch: Optional[int] = None) -> Tensor:
        """student: (S, B, out_dim), teacher: (T, B, out_dim) -> fp32 loss; updates the center."""
        if self.centering == "sinkhorn":
            return dino_loss_sinkhorn(student, teacher, self.student_temp,
                                      self.teacher_temperature(epoch), self.sinkhorn_iterations)
        # A copy of the center: the op keeps it for backward and update_center writes in place.
        loss = dino_loss(student, teacher, self.center.clone(), self.student_temp,
                         self.teacher_temperature(epoch))
        self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: Tensor, teacher_weight: Optional[Tensor] = None) -> None:
        """center <- m * center + (1 - m) * teacher_mean(teacher, teacher_weight): the teacher's
        (T, B, K) logits, or its (..., H) features with its prototypes teacher_weight (K, H)."""
        batch_center = teacher_mean(teacher, teacher_weight).to(self.center.dtype)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


@torch.no_grad()
def teacher_mean(teacher: Tensor, teacher_weight: Optional[Tensor] = None, *,
                 gather: bool = True) -> Tensor:
    """The mean of the teacher's logit rows, (1, K) float32 (float64 for float64 inputs): what
    DINO's (and iBOT's) running center moves towards. teacher: (..., K) logits; or (..., H)
    features with teacher_weight (K, H) the prototypes, when the logits (teacher W^T) are never
    materialized (fastcl.dino_head_loss): they are linear in the features, so their mean is
    mean(features) W^T, a (1, H) x (H, K) product. gather=True averages over every rank's rows
    under torch.distributed (each rank passing the same number), as the official code does; it
    sums in fp32 where the official code sums in the teacher's dtype."""
    acc = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    rows = teacher.reshape(-1, teacher.shape[-1])
    total = rows.sum(dim=0, keepdim=True, dtype=acc)
    if teacher_weight is not None:
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != rows.shape[1]:
            raise ValueError(f"teacher_weight must have shape (K, {rows.shape[1]}) for teacher "
                             f"features (..., {rows.shape[1]}), got {tuple(teacher_weight.shape)}")
        total = total @ teacher_weight.to(acc).T
    _, size = world()
    if gather and size > 1:
        dist.all_reduce(total)
    return total / (rows.shape[0] * (size if gather else 1))
