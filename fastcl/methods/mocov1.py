"""MoCo v1 (He et al. 2020): a query encoder against a momentum key encoder and a queue of past
keys, through fastcl.info_nce (queue read in place) and fastcl.momentum_update.

    q = n(f_q(x_q)),  k = n(f_k(x_k)) (no gradient),  loss = CE([q . k, q . queue] / tau, label 0)

f = backbone + a linear head to ``dim`` (v1; MoCo v2 puts an MLP there). Not symmetrized. Per step
the key encoder follows the query encoder, theta_k <- m theta_k + (1 - m) theta_q, before the keys
are computed: the update runs in ``after_step``, i.e. right after the optimizer step and before
the next step's key forward, which is the same sequence. The keys then enter the queue (gathered
from every rank under torch.distributed); the queue's pointer is a buffer, saved with checkpoints,
and any queue size works (the official code asserts queue_size % batch == 0).

Shuffle BN: the keys are computed with BatchNorm statistics of other samples than the queries',
so that BN cannot leak which key is the positive. Under torch.distributed (gather) every rank's
images are gathered and rank r encodes the rows r, r + W, r + 2W, ... (a cross-rank shuffle; the
batch order is already random, so a fixed interleave is as good as MoCo's random permutation and
needs no broadcast); on one process the batch is encoded in ``bn_groups`` interleaved sub-batches,
each with its own statistics.

Defaults scaled to small data: the paper's queue of 65536 and m = 0.999 assume ~5000 steps per
epoch; here a queue of 1024 keys and m = 0.99 (a few hundred steps in all), SGD as the paper's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl import _checks
from fastcl.augment import Recipe
from fastcl.distributed import all_gather_no_grad, world
from fastcl.losses import InfoNCELoss
from fastcl.methods.base import (MOCO_V1_COLOR, Method, min_scale_hparam, momentum_copy,
                                 momentum_follow)


def _interleave(n: int, groups: int, device) -> Tensor:
    """(n,) order that puts rows j, j + groups, j + 2 groups, ... of group j together."""
    return torch.cat([torch.arange(j, n, groups, device=device) for j in range(groups)])


@torch.no_grad()
def shuffled_bn_forward(encoder: nn.Module, x: Tensor, groups: int, gather: bool) -> Tensor:
    """encoder(x) for x (B, ...) with BatchNorm statistics that mix other samples than x's batch
    (MoCo's shuffle BN): across ranks when gather is True and torch.distributed runs on several,
    else over `groups` interleaved sub-batches of x (groups = 1: a plain forward). -> (B, D)."""
    rank, size = world() if gather else (0, 1)
    if size > 1:
        everything = all_gather_no_grad(x)  # (W B, ...), rank-major
        order = _interleave(everything.shape[0], size, x.device)
        mine = order.view(size, -1)[rank]
        keys = all_gather_no_grad(encoder(everything[mine]))  # rows in `order`
        unshuffled = torch.empty_like(keys)
        unshuffled[order] = keys
        return unshuffled[rank * x.shape[0]:(rank + 1) * x.shape[0]]
    groups = max(1, min(groups, x.shape[0] // 2))  # BatchNorm needs 2 samples per group
    if groups == 1:
        return encoder(x)
    order = _interleave(x.shape[0], groups, x.device)
    parts = [encoder(x[j::groups]) for j in range(groups)]  # each with its own statistics
    keys = torch.cat(parts)
    unshuffled = torch.empty_like(keys)
    unshuffled[order] = keys
    return unshuffled


class MoCoV1(Method):
    """MoCo v1: queries against a momentum encoder's keys and a queue of past keys."""

    name = "mocov1"
    HPARAMS = {
        "temperature": (0.07, "InfoNCE temperature"),
        "dim": (128, "embedding (queue) dimension"),
        "queue_size": (1024, "keys kept as negatives (65536 on ImageNet)"),
        "momentum": (0.99, "key encoder momentum m (0.999 on ImageNet)"),
        "bn_groups": (4, "interleaved sub-batches of the key forward on one process (shuffle BN); "
                         "1: none"),
        "min_scale": min_scale_hparam(0.2),
    }
    DEFAULTS = {**Method.DEFAULTS, "optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4,
                "epochs": 30}

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        for name in ("dim", "queue_size", "bn_groups"):
            self.check_int(name, 1)
        _checks.unit_interval("momentum", hp["momentum"])
        self.head = nn.Linear(backbone.out_dim, hp["dim"])
        self.key_encoder = momentum_copy(backbone, self.head)
        self.queue = fastcl.Queue(hp["queue_size"], hp["dim"])
        self.criterion = InfoNCELoss(hp["temperature"])

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return self.same_views(image_size, **MOCO_V1_COLOR)

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        x_q, x_k = views
        q = self.head(self.backbone(x_q))
        k = shuffled_bn_forward(self.key_encoder, x_k, self.hparams["bn_groups"], self.gather)
        # Keys and the loss in at least float32 (bf16 under autocast), float64 in float64.
        k = F.normalize(k.to(torch.promote_types(k.dtype, torch.float32)), dim=1)
        loss = self.criterion(q.to(k.dtype), k, self.queue.tensor)
        if self.training:
            self.queue.enqueue(k, gather=self.gather)
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        momentum_follow(self.key_encoder, self.backbone, self.head,
                        momentum=self.hparams["momentum"])
