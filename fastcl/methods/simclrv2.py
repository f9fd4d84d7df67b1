"""SimCLR v2 (Chen et al. 2020b): SimCLR with a deeper projector and, optionally, a MoCo-style
memory of negatives, through fastcl.losses.simclrv2 (fastcl.nt_xent's fused op + bank_lse).

z = n(g(f(x))) with a 3-layer projector g: d -> h (BN, ReLU) -> h (BN, ReLU) -> out_dim (BN).
The loss is NT-Xent over the 2N anchors (the paper's mean; the official code sums the two
directions). With ``memory_size`` > 0, a momentum copy of backbone + projector (EMA
``memory_momentum``, 0.999 in the paper) embeds both views and its normalized outputs are buffered
in a fastcl.Queue; every anchor also contrasts against those K rows (extra negatives, read in
place), and the step's momentum embeddings enter the queue after the loss (gathered from every
rank under torch.distributed). The paper fine-tunes from the projector's first layer; evaluation
here reads the backbone, as for every method.

Official: LARS, lr 0.3 * B / 256 (sqrt scaling 0.075 * sqrt(B) for long runs), wd 1e-4, tau 0.1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl.augment import Recipe
from fastcl.losses.simclrv2 import NTXentMemoryLoss
from fastcl.methods.base import Method, min_scale_hparam
from fastcl.methods.mocov1 import momentum_copy
from fastcl.models import mlp


class SimCLRv2(Method):
    """SimCLR v2: a deeper projector and, optionally, a memory of negatives."""

    name = "simclrv2"
    HPARAMS = {
        "temperature": (0.2, "NT-Xent temperature (0.1 on ImageNet)"),
        "proj_hidden": (512, "projector hidden width"),
        "proj_dim": (128, "projection (loss) dimension"),
        "memory_size": (0, "momentum-network embeddings kept as extra negatives (0: none)"),
        "memory_momentum": (0.99, "EMA of the memory network (0.999 on ImageNet)"),
        "min_scale": min_scale_hparam(0.08),
        "jitter_strength": (0.5, "color jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s) (SimCLR: 1.0 "
                                 "ImageNet, 0.5 CIFAR)"),
    }
    DEFAULTS = dict(optimizer="adamw", lr=2e-3, weight_decay=1e-4, batch_size=128, epochs=12,
                    warmup_epochs=1, width=0.5)

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        if not (isinstance(hp["memory_size"], int) and hp["memory_size"] >= 0):
            raise ValueError(f"memory_size must be an integer >= 0, got {hp['memory_size']!r}")
        if not 0.0 <= hp["memory_momentum"] <= 1.0:
            raise ValueError(f"memory_momentum must be in [0, 1], got {hp['memory_momentum']}")
        hidden = hp["proj_hidden"]
        self.projector = mlp([backbone.out_dim, hidden, hidden, hp["proj_dim"]],
                             last_batch_norm=True)
        self.criterion = NTXentMemoryLoss(hp["temperature"], gather=self.gather)
        if hp["memory_size"]:
            self.memory_encoder = momentum_copy(nn.Sequential(backbone, self.projector))
            self.memory = fastcl.Queue(hp["memory_size"], hp["proj_dim"])

    def view_recipes(self, image_size: int) -> list[Recipe]:
        s = self.hparams["jitter_strength"]
        scale = self.crop_range((self.hparams["min_scale"], 1.0))
        recipe = Recipe(image_size, scale=scale, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
                        jitter_p=0.8, gray_p=0.2, blur_p=0.5)
        return [recipe, recipe]

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        if not self.hparams["memory_size"]:
            return self.criterion(z1, z2)
        loss = self.criterion(z1, z2, self.memory.tensor)
        if self.training:
            with torch.no_grad():
                keys = F.normalize(self.memory_encoder(torch.cat(views)).float(), dim=1)
            self.memory.enqueue(keys, gather=self.gather)
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        if self.hparams["memory_size"]:
            fastcl.momentum_update(self.memory_encoder,
                                   nn.Sequential(self.backbone, self.projector),
                                   self.hparams["memory_momentum"])
