"""InstDisc (Wu et al. 2018): non-parametric instance discrimination against a memory bank, through
fastcl.MemoryBank and the sampled-negative ops.

f = n(fc(backbone(x))) (fc: d -> feat_dim, 128 in the paper). The bank V holds one feat_dim row per
training image. Per anchor, row 0 is its own bank row and ``num_negatives`` (K) rows are drawn
uniformly with replacement; s_j = v_j . f / tau.

- loss="nce" (the paper): P_j = exp(s_j) / Z, InstDisc's NCE with noise K / n
  (fastcl.InstDiscNCELoss), Z estimated on the first batch as mean(exp(s)) * n, then frozen.
- loss="softmax" (the default here): cross-entropy over the K + 1 logits with label 0
  (fastcl.sampled_info_nce), the full-softmax variant later work prefers. On a small data set the
  paper's NCE diverges: as features and bank rows align, exp(s_j) soon outgrows the Z frozen at
  the random start (on the 1438 digits, K / n = 2.8: the loss grew from 16 to 1200 in ten epochs
  while the kNN fell from 0.83 to 0.47), so softmax is the default and NCE the paper's option.

After each step the batch's rows become v_i <- n(0.5 v_i + 0.5 f_i) (``bank_momentum``), from the
features of that step's forward, as InstDisc's code updates them after computing the gradient.
The negatives' rows are drawn in ``augment`` from the step's generator, so a resumed run draws what
the uninterrupted run would have drawn. Differences from the paper: a cosine learning rate (the
trainer's schedule) instead of the steps x0.1 at epochs 120 and 160.

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
from fastcl.methods.base import Method, min_scale_hparam

LOSSES = ("nce", "softmax")


def check_bank_setup(method: Method, loss: str) -> None:
    """Checks shared by the memory-bank methods (InstDisc, CMC)."""
    if method.num_items < 1:
        raise ValueError(f"{method.name} needs num_items >= 1, the number of training images (one "
                         f"memory-bank row each), got {method.num_items}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if method.hparams["num_negatives"] < 1:
        raise ValueError(f"num_negatives must be >= 1, got {method.hparams['num_negatives']}")


def check_indices(method: Method, indices: Optional[Tensor], batch: int) -> Tensor:
    if indices is None:
        raise ValueError(f"{method.name} needs indices=, the (B,) training-set rows of the batch "
                         f"(its memory-bank rows)")
    if indices.shape != (batch,):
        raise ValueError(f"indices must have shape ({batch},), one per image, got "
                         f"{tuple(indices.shape)}")
    return indices


def bank_recipe(image_size: int, scale: tuple[float, float], color: bool) -> Recipe:
    """InstDisc's and CMC's augmentation: crop (area fractions `scale`) and flip; InstDisc adds
    color jitter 0.4 and grayscale p=0.2 (color=True)."""
    if color:
        return Recipe(image_size, scale=scale, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0,
                      gray_p=0.2, blur_p=0.0)
    return Recipe(image_size, scale=scale, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


class InstDisc(Method):
    """InstDisc: instance discrimination against a memory bank (NCE or softmax)."""

    name = "instdisc"
    batch_extras = ("indices",)
    HPARAMS = {
        "temperature": (0.07, "temperature tau of the bank logits"),
        "feat_dim": (128, "embedding and bank-row dimension"),
        "num_negatives": (4096, "bank rows K drawn per anchor (uniform, with replacement)"),
        "loss": ("softmax", "softmax (cross-entropy over the K + 1 logits) or nce (the paper: "
                            "NCE, Z frozen after the first batch)"),
        "bank_momentum": (0.5, "memory-bank update v <- n(m v + (1 - m) f)"),
        "min_scale": min_scale_hparam(0.2),
    }
    # Scaled to small data and CPU budgets (as the other methods here): AdamW, a half-width
    # backbone and 12 epochs; InstDisc's SGD (lr 0.03, 200 epochs, steps at 120 and 160) needs
    # far longer runs.
    DEFAULTS = dict(optimizer="adamw", lr=2e-3, weight_decay=1e-4, batch_size=128, epochs=12,
                    warmup_epochs=1, width=0.5)

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        check_bank_setup(self, hp["loss"])
        self.head = nn.Linear(backbone.out_dim, hp["feat_dim"])
        self.memory = fastcl.MemoryBank(self.num_items, hp["feat_dim"],
                                        momentum=hp["bank_momentum"])
        self.nce = (fastcl.InstDiscNCELoss(self.num_items, hp["temperature"])
                    if hp["loss"] == "nce" else None)
        self._pending_update: Optional[tuple[Tensor, Tensor]] = None

    def view_recipes(self, image_size: int) -> list[Recipe]:
        scale = self.crop_range((self.hparams["min_scale"], 1.0))
        return [bank_recipe(image_size, scale, color=True)]

    def augment(self, images: Tensor, g: torch.Generator) -> list[Tensor]:
        """[view (B, C, s, s), negatives (B, K) int64 bank rows drawn from g]."""
        shape = (images.shape[0], self.hparams["num_negatives"])
        negatives = torch.randint(0, self.num_items, shape, generator=g, device=images.device)
        return super().augment(images, g) + [negatives]

    def embed(self, images: Tensor) -> Tensor:
        """images (B, C, s, s) -> f (B, feat_dim), unit rows in fp32."""
        return F.normalize(self.head(self.backbone(images)).float(), dim=1)

    def forward(self, views: list[Tensor], *, epoch: int = 0,
                indices: Optional[Tensor] = None) -> Tensor:
        images, negatives = views
        indices = check_indices(self, indices, images.shape[0])
        f = self.embed(images)
        rows = torch.cat([indices[:, None], negatives], dim=1)  # (B, K + 1), column 0 positive
        if self.nce is not None:
            loss = self.nce(f, self.memory.tensor, rows)
        else:
            loss = fastcl.sampled_info_nce(f, self.memory.tensor, rows, self.hparams["temperature"])
        if self.training:
            self._pending_update = (indices, f.detach())
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        if self._pending_update is not None:
            indices, f = self._pending_update
            self.memory.update(indices, f, gather=self.gather)
            self._pending_update = None

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
