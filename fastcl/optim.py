"""Optimizers (SGD, LARS, AdamW) with the usual exclusions, and the cosine schedule with warm-up.

Biases and normalization parameters (every parameter with fewer than 2 dimensions) get no weight
decay and, under LARS, no trust-ratio adaptation: SimCLR's, BYOL's and SwAV's rule.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-layer step is scaled by the trust ratio
    eta * ||w|| / ||grad + wd * w|| (You et al.), as SimCLR's and BYOL's LARS.

    Parameter groups with ``lars_exclude=True`` take the plain momentum-SGD step (no ratio).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d * ratio
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases / norm parameters (neither); and
    the same two for parameters marked ``fixed_lr = True`` (SimSiam's predictor), flagged
    ``fixed_lr`` so that set_lr leaves them at the peak lr."""
    decay, no_decay, fixed_decay, fixed_no_decay = [], [], [], []
    for p in model.parameters():
        if p.requires_grad:
            fixed = getattr(p, "fixed_lr", False)
            if p.ndim < 2:
                (fixed_no_decay if fixed else no_decay).append(p)
            else:
                (fixed_decay if fixed else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay),
              dict(params=no_decay, weight_decay=0.0, lars_exclude=True)]
    if fixed_decay or fixed_no_decay:
        groups += [dict(params=fixed_decay, weight_decay=weight_decay, fixed_lr=True),
                   dict(params=fixed_no_decay, weight_decay=0.0, lars_exclude=True,
                        fixed_lr=True)]
    return groups


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """name in OPTIMIZERS; `lr` is the peak learning rate (the schedule sets it each step)."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, peak: float,
                       final: float = 0.0) -> float:
    """Linear warm-up from 0 to peak over warmup_steps, then cosine decay to `final`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, groups: Iterable[dict] | None = None
           ) -> None:
    for g in optimizer.param_groups if groups is None else groups:
        if not g.get("fixed_lr", False):
            g["lr"] = lr
