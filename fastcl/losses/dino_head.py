"""DINO's and iBOT's losses fused with the last layer of the projection head (DINOv2's DINOHead:
bottleneck features times the K prototypes), so that the (crops, B, K) logits never exist.

The caller passes the prototype matrices as they are used: DINOHead's weight-normalized last layer
is ``W = g * v / ||v||`` (``nn.utils.weight_norm`` or its parametrization; with g fixed at 1 the
rows of W are unit vectors). The losses equal the formulas on the materialized logits:

    dino_head_loss(student, teacher, Ws, Wt, center) == dino_loss(student @ Ws.T, teacher @ Wt.T,
                                                                  center)
    centering="sinkhorn":                            == dino_loss_sinkhorn(student @ Ws.T, ...)

and gradients reach student and student_weight (hence v and g through autograd) only. The fused op
(fastcl/ops/dino_head.py) keeps O((S + T) B) statistics for backward and recomputes the logits
tile by tile over K there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl import _checks
from fastcl.losses.dino import CENTERINGS, Temperature, _check_crops
from fastcl.ops import dino_head as ops


def _check_weights(h: int, device, dtype, **weights: Tensor) -> int:
    """(K, H) prototype matrices of the same K, the features' H, device and dtype -> K."""
    for name, w in weights.items():
        _checks.embeddings(name, w)
        if w.shape[1] != h:
            raise ValueError(f"{name} must have shape (K, H) with H = {h} (the features' last "
                             f"dimension), got {tuple(w.shape)}")
    ks = {tuple(w.shape) for w in weights.values()}
    if len(ks) > 1:
        listed = ", ".join(f"{n} {tuple(w.shape)}" for n, w in weights.items())
        raise ValueError(f"the prototype matrices must have the same shape (K, H), got {listed}")
    for name, w in weights.items():
        if w.device != device:
            raise ValueError(f"{name} must be on the features' device ({device}), got {w.device}")
        if w.dtype != dtype:
            raise TypeError(f"{name} must have the features' dtype ({dtype}), got {w.dtype}")
    return next(iter(weights.values())).shape[0]


def _check_center(center, k: int, like: Tensor, centering: str) -> Optional[Tensor]:
    """The (K,) or (1, K) center as a detached (K,) tensor; None allowed for Sinkhorn centering."""
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    if center is None and centering == "sinkhorn":
        return None
    if not isinstance(center, Tensor):
        raise TypeError(f"center must be a torch.Tensor, got {type(center).__name__}")
    if center.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"center must be a floating tensor, got {center.dtype}")
    if center.numel() != k or center.dim() > 2:
        raise ValueError(f"center must have shape ({k},) or (1, {k}), got {tuple(center.shape)}")
    _checks.same_device(features=like, center=center)
    return center.detach().reshape(k)


def _teacher_targets(teacher: Tensor, teacher_weight: Tensor, center: Optional[Tensor],
                     teacher_temp: Temperature, centering: str, iterations: int,
                     like: Tensor) -> tuple[Tensor, Tensor]:
    """(center (K,), teacher_scale ()) for the op: the given center at 1 / teacher_temp, or the
    Sinkhorn center at 1 / epsilon (its codes are the teacher's softmax)."""
    if centering == "ema":
        scale = _checks.inverse_temperature(teacher_temp, like, "teacher_temp").detach()
        return center, scale
    if not isinstance(teacher_temp, (int, float)) or isinstance(teacher_temp, bool):
        raise TypeError(f"teacher_temp must be a float (Sinkhorn's epsilon), got "
                        f"{type(teacher_temp).__name__}")
    _checks.positive_scalar("teacher_temp", teacher_temp, tensor=False)
    _checks.count("sinkhorn_iterations", iterations)
    rows = teacher.detach().reshape(-1, teacher.shape[-1])
    sinkhorn_center = ops.head_sinkhorn_center(rows, teacher_weight.detach(), float(teacher_temp),
                                               int(iterations), True)
    return sinkhorn_center, _checks.inverse_temperature(float(teacher_temp), like, "teacher_temp")


def dino_head_loss(
    student: Tensor,
    teacher: Tensor,
    student_weight: Tensor,
    teacher_weight: Tensor,
    center: Optional[Tensor],
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
    *,
    centering: str = "ema",
    sinkhorn_iterations: int = 3,
) -> Tensor:
    """DINO's loss on the logits of the head's last layer, without materializing them.

    student: (S, B, H) bottleneck features of S crops; teacher: (T, B, H) those of the teacher for
    the student's first T crops (T <= S, S >= 2); student_weight, teacher_weight: (K, H) each
    network's prototypes as used (e.g. weight-normalized); center: (K,) or (1, K).
    Returns the fp32 scalar fastcl.dino_loss(student @ student_weight.T, teacher @
    teacher_weight.T, center, student_temp, teacher_temp), differentiable in student and
    student_weight (teacher, teacher_weight and center are detached).

    centering="sinkhorn": DINOv2's Sinkhorn-Knopp teacher instead of the center (which may then be
    None): the value of fastcl.dino_loss_sinkhorn on the logits (epsilon = teacher_temp, a float,
    `sinkhorn_iterations` steps, all ranks' rows together under torch.distributed), in log domain
    so that it stays finite where exp(logits / teacher_temp) overflows. It costs 2
    sinkhorn_iterations - 1 extra (T B, H) x (H, K) products (see
    fastcl.ops.dino_head.sinkhorn_center_tiled).

    The running center's update needs no logits either: fastcl.teacher_mean(teacher,
    teacher_weight), or DINOLoss.update_center(teacher, teacher_weight).
    """
    _check_crops(student, teacher, last="H")
    s, b, h = student.shape
    t = teacher.shape[0]
    k = _check_weights(h, student.device, student.dtype, student_weight=student_weight,
                       teacher_weight=teacher_weight)
    center = _check_center(center, k, student, centering)
    student_scale = _checks.inverse_temperature(student_temp, student, "student_temp").detach()
    center, teacher_scale = _teacher_targets(teacher, teacher_weight, center, teacher_temp,
                                             centering, sinkhorn_iterations, student)
    acc = student_scale.dtype
    row_weight = torch.full((b,), 1.0 / (t * (s - 1) * b), dtype=acc, device=student.device)
    return ops.head_cross_entropy(student, teacher.detach(), student_weight,
                                  teacher_weight.detach(), center.to(acc), student_scale,
                                  teacher_scale, row_weight, False)[0]


def ibot_patch_loss(
    student_patches: Tensor,
    teacher_patches: Tensor,
    student_weight: Tensor,
    teacher_weight: Tensor,
    center: Optional[Tensor],
    masks_weight: Tensor,
    student_temp: Temperature = 0.1,
    teacher_temp: Temperature = 0.04,
    *,
    n_images: Optional[int] = None,
    centering: str = "ema",
    sinkhorn_iterations: int = 3,
) -> Tensor:
    """iBOT's masked-patch loss (DINOv2's iBOTPatchLoss.forward_masked) on the head's logits,
    without materializing them.

    student_patches, teacher_patches: (N, H) bottleneck features of the N masked patch tokens
    (student and teacher, same tokens); weights (K, H) and center (K,) or (1, K) as
    :func:`dino_head_loss`; masks_weight: (N,) each token's weight, DINOv2's 1 / (number of
    masked tokens of its image). Returns the fp32 scalar
        -1 / n_images sum_n masks_weight_n sum_k p_n,k log q_n,k,
    p_n = softmax((teacher_n W_t^T - center) / teacher_temp), q_n = softmax(student_n W_s^T /
    student_temp): DINOv2's value with n_images = the number of images the masks were drawn for
    (student_masks_flat.shape[0]); n_images=None divides by masks_weight.sum() instead (the
    weighted mean over tokens). Gradients reach student_patches and student_weight only.
    centering="sinkhorn": the teacher's probabilities are DINOv2's sinkhorn_knopp_teacher over
    the N rows (all ranks' rows together), as in :func:`dino_head_loss`.
    """
    _checks.paired_embeddings(student_patches=student_patches, teacher_patches=teacher_patches)
    n, h = student_patches.shape
    k = _check_weights(h, student_patches.device, student_patches.dtype,
                       student_weight=student_weight, teacher_weight=teacher_weight)
    center = _check_center(center, k, student_patches, centering)
    if not isinstance(masks_weight, Tensor):
        raise TypeError(f"masks_weight must be a torch.Tensor, got {type(masks_weight).__name__}")
    if masks_weight.dtype not in _checks.FLOAT_DTYPES or masks_weight.shape != (n,):
        raise ValueError(f"masks_weight must be a floating tensor of shape ({n},), got "
                         f"{masks_weight.dtype} {tuple(masks_weight.shape)}")
    _checks.same_device(student_patches=student_patches, masks_weight=masks_weight)
    student_scale = _checks.inverse_temperature(student_temp, student_patches,
                                                "student_temp").detach()
    acc = student_scale.dtype
    weights = masks_weight.detach().to(acc)
    if n_images is None:
        weights = weights / weights.sum()
    else:
        weights = weights / _checks.count("n_images", n_images)
    center, teacher_scale = _teacher_targets(teacher_patches, teacher_weight, center, teacher_temp,
                                             centering, sinkhorn_iterations, student_patches)
    return ops.head_cross_entropy(student_patches[None], teacher_patches.detach()[None],
                                  student_weight, teacher_weight.detach(), center.to(acc),
                                  student_scale, teacher_scale, weights, True)[0]
