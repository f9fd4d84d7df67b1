"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn codes, through fastcl.sinkhorn.

z = n(proj(f(x))) for every crop; scores = z C^T against K prototypes C (rows re-normalized before
each step). For each of the two large crops t, codes q_t = sinkhorn(sg(scores_t)) (epsilon 0.05,
3 iterations, over every rank's samples); the loss is

    L = (1/2) sum_t (1/(V-1)) sum_{s != t} -mean_b sum_k q_t log softmax(scores_s / temperature)

over V crops: 2 large crops plus ``num_small_crops`` small ones (multi-crop). The prototypes get no
gradient during the first ``freeze_prototypes_epochs`` epochs. With ``queue_length`` > 0, the
embeddings of past large crops are kept and their scores prepended for Sinkhorn only (more samples
for the equipartition): the queue fills from epoch ``queue_start_epoch`` on and is used once full.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl.augment import Recipe
from fastcl.distributed import all_gather_no_grad
from fastcl.methods.base import CROP_FLOOR_HELP, Method, simclr_color
from fastcl.models import mlp


class SwAV(Method):
    """SwAV: swapped prediction of the Sinkhorn codes of multi-crop views."""

    name = "swav"
    HPARAMS = {
        "temperature": (0.2, "softmax temperature of the swapped prediction (0.1 on ImageNet; "
                             "0.2 learns much faster in short runs on small data)"),
        "epsilon": (0.05, "Sinkhorn entropic regularization"),
        "sinkhorn_iterations": (3, "Sinkhorn-Knopp iterations"),
        "num_prototypes": (100, "number of prototypes K (3000 on ImageNet; fewer for small data)"),
        "proj_hidden": (512, "projector hidden width"),
        "proj_dim": (128, "projection dimension"),
        "num_small_crops": (2, "small crops per image (multi-crop; 6 on ImageNet); none where "
                               "even the largest would be under the data set's smallest crop "
                               "that shows the object (the digits, digits-shift)"),
        "min_scale": (0.14, f"smallest area fraction of the large crops ({CROP_FLOOR_HELP})"),
        "small_scale": (0.14, "largest area fraction of the small crops (smallest: 0.05, raised "
                              "like the large crops' floor)"),
        "jitter_strength": (0.5, "color jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s)"),
        "freeze_prototypes_epochs": (1, "epochs during which the prototypes get no gradient"),
        "queue_length": (0, "past large-crop embeddings prepended for Sinkhorn (0: no queue)"),
        "queue_start_epoch": (15, "epoch from which the queue is used"),
    }
    DEFAULTS = {**Method.DEFAULTS, "epochs": 15}  # SwAV: LARS at lr 4.8, B 4096

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        self.projector = mlp([backbone.out_dim, hp["proj_hidden"], hp["proj_dim"]])
        self.prototypes = nn.Linear(hp["proj_dim"], hp["num_prototypes"], bias=False)
        # (2, L, proj_dim) past embeddings of the two large crops, newest first; all zero = empty.
        self.register_buffer("queue", torch.zeros(2, hp["queue_length"], hp["proj_dim"]))

    def view_recipes(self, image_size: int) -> list[Recipe]:
        hp = self.hparams
        color = simclr_color(hp["jitter_strength"])
        return [*self.same_views(image_size, **color),
                *self.small_crops(hp["small_scale"], hp["num_small_crops"], **color)]

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        hp = self.hparams
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        # Crops of one size go through the backbone together (one batch per resolution), then
        # the projector sees every crop's features at once (its BatchNorm too, as SwAV's).
        features = [self.backbone(torch.cat(group)) for group in (views[:2], views[2:]) if group]
        z = F.normalize(self.projector(torch.cat(features)), dim=1).chunk(len(views))
        scores = [self.prototypes(e) for e in z]
        batch = views[0].shape[0]
        # The queue exists from queue_start_epoch on: empty then, used once full (as SwAV's).
        use_queue = hp["queue_length"] > 0 and epoch >= hp["queue_start_epoch"]

        acc = torch.promote_types(scores[0].dtype, torch.float32)  # fp32, fp64 for fp64
        loss = scores[0].new_zeros((), dtype=acc)
        for t in range(2):
            with torch.no_grad():
                s = scores[t].detach().to(acc)
                if use_queue and bool(self.queue[t, -1].any()):  # used once full, as SwAV
                    s = torch.cat([self.queue[t] @ self.prototypes.weight.T, s])
                codes = fastcl.sinkhorn(s, epsilon=hp["epsilon"],
                                        iterations=hp["sinkhorn_iterations"],
                                        gather=self.gather)[-batch:]
            for v in range(len(scores)):
                if v != t:
                    log_p = F.log_softmax(scores[v].to(acc) / hp["temperature"], dim=1)
                    loss = loss - (codes * log_p).sum(1).mean() / (len(scores) - 1)
        if use_queue and self.training:
            self._enqueue(torch.stack([z[0].detach(), z[1].detach()]))
        return loss / 2

    @torch.no_grad()
    def _enqueue(self, emb: Tensor) -> None:
        """emb (2, B, D), gathered over ranks, pushed to the front of the queue."""
        emb = torch.stack([all_gather_no_grad(e) for e in emb]) if self.gather else emb
        keep = max(0, self.queue.shape[1] - emb.shape[1])
        self.queue[:, emb.shape[1]:] = self.queue[:, :keep].clone()
        self.queue[:, :min(emb.shape[1], self.queue.shape[1])] = emb[:, :self.queue.shape[1]]

    def after_backward(self, epoch: int) -> None:
        if epoch < self.hparams["freeze_prototypes_epochs"]:
            self.prototypes.weight.grad = None
