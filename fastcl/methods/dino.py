"""DINO (Caron et al. 2021): self-distillation with no labels, through fastcl.DINOLoss (the fused
multi-crop cross-entropy with centering and the teacher-temperature warm-up).

Student = backbone + DINO head, on every crop: 2 global crops (area 0.4-1) and ``num_local_crops``
local ones (area 0.05-0.4, at 96/224 of the side; the smallest raised like the global crops'
floor, and none where even the largest would be under it: on the digits and digits-shift).
Teacher = a momentum copy of both, on the two global crops only, without gradient. The head is
an MLP d -> h -> h -> bottleneck (GELU; BatchNorm after the hidden layers with ``bn_in_head``, the
official use_bn_in_head), then n() and a weight-normalized Linear(bottleneck -> out_dim) without
bias whose norm g is fixed at 1 (norm_last_layer, the official default; ``norm_last_layer`` 0
learns g).

    L = mean over pairs (t global, s != t) of -sum_k P_t,k log softmax(g_s / tau_s)_k

with P_t = softmax((g_t - c) / tau_t) and the center c <- 0.9 c + 0.1 mean(teacher outputs) after
each loss (``centering`` ema: DINO's), or P_t = the Sinkhorn-Knopp codes of the batch's teacher
outputs with epsilon tau_t (``centering`` sinkhorn: DINOv2's); tau_t is warmed up linearly from
``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs. The last
layer gets no gradient during the first ``freeze_last_layer`` epochs; gradients are clipped per
parameter to norm ``clip_grad`` (the official clip_gradients) before the optimizer step. The
teacher follows the student with a cosine momentum from ``teacher_momentum`` to 1, per step.
Works with the ResNet and ViT backbones (ViT-S/16 and R50 in the paper).

Official: AdamW, lr 5e-4 * B / 256 with warm-up, wd 0.04 -> 0.4 (cosine; here the trainer's
constant wd), out_dim 65536, tau_s 0.1, tau_t 0.04 -> 0.07 over 30 of 100 epochs, momentum 0.996,
EMA centering, no BN in the head. The defaults depart from these where a short run on small images
needs it: with the official ones the student collapses to the uniform marginal on the digits (a
random network's outputs for two crops of an 8 px image hardly agree), while Sinkhorn centering
(targets balanced over the prototypes in every batch), 128 prototypes, tau_s 0.2, BN in the head
and a faster teacher (0.9) learn them (docs/methods.md, "DINO's defaults").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl import _checks
from fastcl.augment import Recipe
from fastcl.losses import DINOLoss
from fastcl.methods.base import (BYOL_COLOR, CROP_FLOOR_HELP, Method, byol_views, momentum_copy,
                                 momentum_follow)
from fastcl.models import mlp


class DINOHead(nn.Module):
    """(B, in_dim) -> (B, out_dim): MLP (GELU, BN after the hidden layers if batch_norm) to
    `bottleneck`, n(), then the weight-normalized last layer W = g * v / ||v|| (rows), g fixed at 1
    unless learn_norm."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int,
                 learn_norm: bool = False, batch_norm: bool = False):
        super().__init__()
        self.mlp = mlp([in_dim, hidden, hidden, bottleneck], batch_norm=batch_norm,
                       activation=nn.GELU)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)  # its weight is v
        self.last_norm = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_norm)

    def bottleneck(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, bottleneck): the MLP's output, L2-normalized."""
        return F.normalize(self.mlp(x), dim=-1)

    def prototypes(self) -> Tensor:
        """(out_dim, bottleneck): the last layer's weight g * v / ||v||."""
        return self.last_norm * F.normalize(self.last_layer.weight, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.bottleneck(x), self.prototypes())


def multi_crop_views(method: Method, image_size: int) -> list[Recipe]:
    """DINO's (and DINOv2's) crops: BYOL's two global views (area global_scale..1), then
    num_local_crops local ones (largest area local_scale, blur p 0.5, BYOL's colour), from the
    method's hyper-parameters of those names."""
    hp = method.hparams
    return [*byol_views(image_size, method.crop_range((hp["global_scale"], 1.0))),
            *method.small_crops(hp["local_scale"], hp["num_local_crops"], blur_p=0.5,
                                **BYOL_COLOR)]


def clip_and_freeze(method: nn.Module, clip: float, heads: list[DINOHead], freeze: bool) -> None:
    """DINO's gradient surgery between backward and the step: every gradient of `method` clipped
    to norm `clip` per parameter (the official clip_gradients; 0: none), and with `freeze` the
    heads' last layers get none (cancel_gradients_last_layer)."""
    student = [p for p in method.parameters() if p.requires_grad and p.grad is not None]
    if clip > 0 and student:
        grads = [p.grad for p in student]
        norms = torch._foreach_norm(grads)
        torch._foreach_mul_(grads, [(clip / (n + 1e-6)).clamp(max=1.0) for n in norms])
    if freeze:
        for head in heads:
            head.last_layer.weight.grad = None
            head.last_norm.grad = None


class DINO(Method):
    """DINO: self-distillation from a momentum teacher over multi-crop views."""

    name = "dino"
    HPARAMS = {
        "out_dim": (128, "prototypes K of the head's last layer (65536 on ImageNet)"),
        "head_hidden": (512, "head MLP hidden width (2048 on ImageNet)"),
        "bottleneck": (128, "head bottleneck before the last layer (256 on ImageNet)"),
        "bn_in_head": (1, "1: BatchNorm after the head's hidden layers (official use_bn_in_head, "
                          "off by default there)"),
        "norm_last_layer": (1, "1: the last layer's norm stays 1 (official default); 0: learnt"),
        "centering": ("sinkhorn", "teacher centering: ema (DINO's running center, the official "
                                  "default) or sinkhorn (DINOv2's Sinkhorn-Knopp)"),
        "student_temp": (0.2, "student softmax temperature (0.1 on ImageNet)"),
        "teacher_temp": (0.07, "teacher temperature after the warm-up"),
        "warmup_teacher_temp": (0.04, "teacher temperature at epoch 0"),
        "warmup_teacher_temp_epochs": (4, "epochs of the linear teacher-temperature warm-up"),
        "center_momentum": (0.9, "EMA of the teacher center"),
        "teacher_momentum": (0.9, "base teacher momentum, cosine to 1 (0.996 on ImageNet)"),
        "freeze_last_layer": (1, "epochs during which the last layer gets no gradient"),
        "clip_grad": (3.0, "per-parameter gradient-norm clip (0: none)"),
        "num_local_crops": (4, "local crops per image (8 on ImageNet); none where even the largest "
                               "would be under the data set's smallest crop that shows the object"),
        "global_scale": (0.4, f"smallest area fraction of the global crops ({CROP_FLOOR_HELP})"),
        "local_scale": (0.4, "largest area fraction of the local crops (smallest: 0.05, raised "
                             "like the global crops' floor)"),
    }
    DEFAULTS = {**Method.DEFAULTS, "weight_decay": 0.04, "epochs": 40}  # DINO's starting wd

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        for name in ("norm_last_layer", "bn_in_head"):
            self.check_choice(name, (0, 1))
        for name in ("num_local_crops", "freeze_last_layer", "warmup_teacher_temp_epochs"):
            self.check_int(name, 0)
        _checks.unit_interval("teacher_momentum", hp["teacher_momentum"])
        if not hp["clip_grad"] >= 0:
            raise ValueError(f"clip_grad must be >= 0, got {hp['clip_grad']}")
        self.head = DINOHead(backbone.out_dim, hp["out_dim"], hp["head_hidden"],
                             hp["bottleneck"], learn_norm=not hp["norm_last_layer"],
                             batch_norm=bool(hp["bn_in_head"]))
        self.teacher = momentum_copy(backbone, self.head)
        self.criterion = DINOLoss(hp["out_dim"], student_temp=hp["student_temp"],
                                  teacher_temp=hp["teacher_temp"],
                                  warmup_teacher_temp=hp["warmup_teacher_temp"],
                                  warmup_teacher_temp_epochs=hp["warmup_teacher_temp_epochs"],
                                  center_momentum=hp["center_momentum"],
                                  centering=hp["centering"])

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return multi_crop_views(self, image_size)

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        batch = views[0].shape[0]
        # Crops of one size go through the backbone together (one batch per resolution), then
        # the head sees every crop's features at once (its BatchNorm too, as the official
        # MultiCropWrapper).
        features = [self.backbone(torch.cat(group)) for group in (views[:2], views[2:]) if group]
        student = self.head(torch.cat(features)).view(len(views), batch, -1)
        with torch.no_grad():
            teacher = self.teacher(torch.cat(views[:2])).view(2, batch, -1)
        return self.criterion(student, teacher, epoch)

    def after_backward(self, epoch: int) -> None:
        clip_and_freeze(self, self.hparams["clip_grad"], [self.head],
                        epoch < self.hparams["freeze_last_layer"])

    def after_step(self, step: int, total_steps: int) -> None:
        # The official code updates after the step with the schedule's value at this step.
        m = fastcl.cosine_schedule(min(step, total_steps), total_steps,
                                   self.hparams["teacher_momentum"], 1.0)
        momentum_follow(self.teacher, self.backbone, self.head, momentum=m)
