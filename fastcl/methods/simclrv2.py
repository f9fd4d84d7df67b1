"""SimCLR v2 (Chen et al. 2020b): SimCLR with a deeper projector and, optionally, a MoCo-style
memory of negatives, through fastcl.losses.simclrv2 (fastcl.nt_xent's fused op + bank_lse).

z = n(g(f(x))) with a 3-layer projector g: d -> h (BN, ReLU) -> h (BN, ReLU) -> out_dim (BN).
The loss is NT-Xent over the 2N anchors (the paper's mean; the official code sums the two
directions). With ``memory_size`` > 0, a momentum copy of backbone + projector (EMA
``memory_momentum``, 0.999 in the paper) embeds both views and its normalized outputs are buffered
in a fastcl.Queue; every anchor also contrasts against those K rows (extra negatives, read in
place), and the step's momentum embeddings enter the queue after the loss (gathered from every
rank under torch.distributed). The paper fine-tunes from the projector's first layer; evaluation
here reads the backbone, as for every method. Augmentation and the other settings: SimCLR's.

Official: LARS, lr 0.3 * B / 256 (sqrt scaling 0.075 * sqrt(B) for long runs), wd 1e-4, tau 0.1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastcl
from fastcl import _checks
from fastcl.losses.simclrv2 import NTXentMemoryLoss
from fastcl.methods.base import momentum_copy, momentum_follow
from fastcl.methods.simclr import SimCLR


class SimCLRv2(SimCLR):
    """SimCLR v2: a deeper projector and, optionally, a memory of negatives."""

    name = "simclrv2"
    HPARAMS = {
        **SimCLR.HPARAMS,
        "memory_size": (0, "momentum-network embeddings kept as extra negatives (0: none)"),
        "memory_momentum": (0.99, "EMA of the memory network (0.999 on ImageNet)"),
    }
    DEFAULTS = {**SimCLR.DEFAULTS, "epochs": 12}
    projector_layers = 3

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        self.check_int("memory_size", 0)
        _checks.unit_interval("memory_momentum", hp["memory_momentum"])
        self.criterion = NTXentMemoryLoss(hp["temperature"], gather=self.gather)
        if hp["memory_size"]:
            self.memory_encoder = momentum_copy(backbone, self.projector)
            self.memory = fastcl.Queue(hp["memory_size"], hp["proj_dim"])

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        z1, z2 = self.project(views)
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
            momentum_follow(self.memory_encoder, self.backbone, self.projector,
                            momentum=self.hparams["memory_momentum"])
