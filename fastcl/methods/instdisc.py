"""InstDisc (Wu et al. 2018): non-parametric instance discrimination against a memory bank, through
fastcl.MemoryBank and the sampled-negative losses (the shared plumbing: base.BankMethod).

f = n(fc(backbone(x))) (fc: d -> feat_dim, 128 in the paper). The bank V holds one feat_dim row per
training image. Per anchor, row 0 is its own bank row and ``num_negatives`` (K) rows are drawn
uniformly with replacement; s_j = v_j . f / tau.

- loss="nce" (the paper): P_j = exp(s_j) / Z, InstDisc's NCE with noise K / n
  (fastcl.InstDiscNCELoss), Z estimated on the first batch as mean(exp(s)) * n, then frozen.
- loss="softmax" (the default here): cross-entropy over the K + 1 logits with label 0
  (fastcl.sampled_info_nce), the full-softmax variant later work prefers. On a small data set the
  paper's NCE diverges (exp(s_j) soon outgrows the Z frozen at the random start; see
  docs/methods.md), so softmax is the default and NCE the paper's option.

After each step the batch's rows become v_i <- n(0.5 v_i + 0.5 f_i) (``bank_momentum``), from the
features of that step's forward. Differences from the paper: a cosine learning rate (the trainer's
schedule) instead of the steps x0.1 at epochs 120 and 160.

Monitor: ``bank_knn_top1`` in metrics.csv is InstDisc's own kNN, test embeddings f against the bank
rows of the training images (k neighbours, weights exp(sim / 0.07)); the trainer's ``knn_top1``
is the same kNN on the backbone's features.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl import evaluate
from fastcl.augment import Recipe
from fastcl.methods.base import MOCO_V1_COLOR, BankMethod, Method


class InstDisc(BankMethod):
    """InstDisc: instance discrimination against a memory bank (NCE or softmax)."""

    name = "instdisc"  # HPARAMS: BankMethod's
    DEFAULTS = {**Method.DEFAULTS, "epochs": 12}  # InstDisc: SGD lr 0.03, 200 epochs

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        self.head = nn.Linear(backbone.out_dim, hp["feat_dim"])
        self.memory = fastcl.MemoryBank(self.num_items, hp["feat_dim"],
                                        momentum=hp["bank_momentum"])
        self.nce = self.nce_loss()

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return self.same_views(image_size, count=1, **MOCO_V1_COLOR)

    def augment(self, images: Tensor, g: torch.Generator) -> list[Tensor]:
        """[view (B, C, s, s), negatives (B, K) int64 bank rows drawn from g]."""
        negatives = self.draw_negatives(images, g)
        return super().augment(images, g) + [negatives]

    def embed(self, images: Tensor) -> Tensor:
        """images (B, C, s, s) -> f (B, feat_dim), unit rows in fp32 (fp64 for fp64)."""
        f = self.head(self.backbone(images))
        return F.normalize(f.to(torch.promote_types(f.dtype, torch.float32)), dim=1)

    def forward(self, views: list[Tensor], *, epoch: int = 0,
                indices: Optional[Tensor] = None) -> Tensor:
        images, negatives = views
        rows = self.bank_rows(indices, negatives, images.shape[0])
        f = self.embed(images)
        loss = self.bank_loss(f, self.memory.tensor, rows, self.nce)
        self.update_after_step(indices, (self.memory, f))
        return loss

    def monitor(self, data, *, mean, std, device, k) -> dict[str, float]:
        test = evaluate.extract_features(_Embedder(self), data.x_test, mean=mean, std=std,
                                         device=device)
        bank = self.memory.tensor.float().cpu()
        return {"bank_knn_top1": evaluate.knn_accuracy(bank, data.y_train, test, data.y_test,
                                                       k=k)}


class _Embedder(nn.Module):
    """method.embed as a module (extract_features switches it to eval mode and back)."""

    def __init__(self, method: InstDisc):
        super().__init__()
        self.method = method

    def forward(self, images: Tensor) -> Tensor:
        return self.method.embed(images)
