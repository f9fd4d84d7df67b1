"""What every method shares: the encoder, its augmentation recipes and the hooks the trainer calls.

A method is an ``nn.Module`` that maps a batch of images to its loss:

    views = method.augment(images, generator)     # list of (B, C, s, s) tensors on the device
    loss = method(views, epoch=epoch, **extras)   # scalar, through the fused ops
    ... backward, optimizer step ...
    method.after_step(step, total_steps)          # momentum encoders, queues

``extras`` holds what the method lists in ``batch_extras``: "indices", the (B,) int64 training-set
rows of the batch (memory banks), and "labels", their (B,) int64 labels (supervised methods).
``method.backbone`` is the encoder that evaluation uses. Hyper-parameters are declared in
``HPARAMS`` (name -> (default, help)) and exposed by the command line as --name; ``DEFAULTS`` gives
the method's trainer defaults (optimizer, lr, batch size, ...), ``Method.DEFAULTS`` plus what the
method changes.

Below ``Method``, what several methods share: the papers' color augmentations, the momentum
(key / target / teacher) encoder, and ``BankMethod``, the memory-bank plumbing of InstDisc and CMC.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn

import fastcl
from fastcl.augment import Recipe, crop_scale


# The help text of a crop-size hyper-parameter: how Method.crop_range raises it on small images.
CROP_FLOOR_HELP = "raised so crops keep >= 6 px on the digits, 10 px on digits-shift"


def min_scale_hparam(default: float) -> tuple[float, str]:
    """The ``min_scale`` entry of a method's HPARAMS: (default, help)."""
    return default, f"smallest random-resized-crop area fraction ({CROP_FLOOR_HELP})"


class Method(nn.Module):
    name: ClassVar[str]
    HPARAMS: ClassVar[dict[str, tuple[Any, str]]] = {}
    # The trainer's defaults (TrainConfig fields), scaled to small images and a CPU budget: AdamW,
    # one warm-up epoch, a half-width ResNet-18, batch 128. The papers' recipes (LARS or SGD at
    # batches of thousands, hundreds of epochs) need far longer runs. A method sets its epochs and
    # overrides what differs: DEFAULTS = {**Method.DEFAULTS, "epochs": 20}.
    DEFAULTS: ClassVar[dict[str, Any]] = dict(optimizer="adamw", lr=2e-3, weight_decay=1e-4,
                                              batch_size=128, warmup_epochs=1, width=0.5,
                                              backbone="resnet18")
    # Per-batch keyword arguments forward needs from the trainer, among "indices" and "labels".
    batch_extras: ClassVar[tuple[str, ...]] = ()
    # Whether the method's loss takes gather="ring" (fastcl/ring.py: no rank holds every rank's
    # embeddings); the others all-gather under torch.distributed.
    ring: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, *, image_size: int, mean: Sequence[float],
                 std: Sequence[float], flip: bool = True, gather: bool = False,
                 num_items: int = 0, min_crop_side: int = 6, **hparams: Any):
        super().__init__()
        unknown = set(hparams) - set(self.HPARAMS)
        if unknown:
            raise ValueError(f"{self.name} has no hyper-parameter(s) {sorted(unknown)}; valid: "
                             f"{sorted(self.HPARAMS)}")
        self.hparams = {k: hparams.get(k, default) for k, (default, _) in self.HPARAMS.items()}
        self.backbone = backbone
        self.image_size = image_size
        # Under torch.distributed, the losses see every rank's embeddings: True all-gathers them,
        # "ring" (methods with ring = True) passes them around the ranks.
        self.gather = gather
        # Training images: the rows of a memory bank indexed by "indices" (0 when not known).
        self.num_items = num_items
        # The smallest crop side in pixels that still shows the object (ImageData.min_crop_side).
        self.min_crop_side = min_crop_side
        # flip=False for data whose meaning a mirror changes (ImageData.mirror_invariant).
        self.recipes = [replace(r, flip_p=r.flip_p if flip else 0.0).with_stats(mean, std)
                        for r in self.view_recipes(image_size)]

    def view_recipes(self, image_size: int) -> list[Recipe]:
        """One Recipe per view, in the order forward expects the views."""
        raise NotImplementedError

    def same_views(self, image_size: int, count: int = 2, **recipe: Any) -> list[Recipe]:
        """`count` views of one Recipe: crops of area min_scale..1 (the ``min_scale``
        hyper-parameter, raised by crop_range) at image_size, flipped; `recipe`: color and blur."""
        scale = self.crop_range((self.hparams["min_scale"], 1.0))
        return [Recipe(image_size, scale=scale, **recipe)] * count

    def crop_range(self, scale: tuple[float, float]) -> tuple[float, float]:
        """A recipe's crop area fractions (low, high), low raised so that crops span at least
        min_crop_side pixels (the ImageNet ranges would cut an 8 px digit to 2 px)."""
        return crop_scale(scale, self.image_size, self.min_crop_side)

    def small_crops(self, largest_scale: float, count: int, **recipe: Any) -> list[Recipe]:
        """Multi-crop's `count` small crops: 96 / 224 of the side (at least 4 px), area fractions
        min(0.05, largest_scale)..largest_scale with the lower end raised to min_crop_side like
        every other crop; none where even the largest would span fewer pixels (they would miss the
        object). `recipe`: the rest of the Recipe (jitter, blur, ...)."""
        low, high = self.crop_range((min(0.05, largest_scale), largest_scale))
        if low > largest_scale:
            return []
        side = max(4, round(self.image_size * 96 / 224))
        return [Recipe(side, scale=(low, high), **recipe)] * count

    def augment(self, images: Tensor, g: torch.Generator) -> list[Tensor]:
        """images (B, C, H, W) uint8 on the device -> one augmented batch per recipe."""
        return [recipe(images, g) for recipe in self.recipes]

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (global step index, total steps of the run)."""

    def after_backward(self, epoch: int) -> None:
        """Called between backward and the optimizer step (gradient surgery, e.g. frozen layers)."""

    def monitor(self, data, *, mean: Sequence[float], std: Sequence[float],
                device: torch.device, k: int) -> dict[str, float]:
        """Extra figures for each epoch's metrics row (e.g. InstDisc's kNN on its memory bank),
        from the ImageData the run trains on."""
        return {}

    def check_int(self, name: str, minimum: int) -> None:
        """A ValueError unless hyper-parameter `name` is an integer >= minimum."""
        value = self.hparams[name]
        if not (isinstance(value, int) and value >= minimum):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    def check_choice(self, name: str, choices: tuple) -> None:
        """A ValueError unless hyper-parameter `name` is one of `choices`."""
        if self.hparams[name] not in choices:
            expected = (f"{', '.join(map(str, choices[:-1]))} or {choices[-1]}"
                        if all(isinstance(c, int) for c in choices) else f"one of {choices}")
            raise ValueError(f"{name} must be {expected}, got {self.hparams[name]!r}")


# ----------------------------------------------------------------------------------------------
# The papers' color augmentations: Recipe arguments besides the crop
# ----------------------------------------------------------------------------------------------
# MoCo v1's (and InstDisc's, InvaSpread's): color jitter 0.4 always, grayscale 0.2, no blur.
MOCO_V1_COLOR = dict(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2, blur_p=0.0)
# MoCo v2's (and SimSiam's): jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur p 0.5.
MOCO_V2_COLOR = dict(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5)
# SupContrast's (and the triplet method's): MoCo v2's without blur.
SUPCON_COLOR = dict(MOCO_V2_COLOR, blur_p=0.0)
# BYOL's (and MoCo v3's, DINO's), before each view's blur and solarize.
BYOL_COLOR = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2)


def simclr_color(strength: float) -> dict[str, Any]:
    """SimCLR's (and SwAV's): color jitter of strength s, (0.8s, 0.8s, 0.8s, 0.2s) p 0.8,
    grayscale 0.2, blur p 0.5."""
    s = strength
    return dict(jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, gray_p=0.2, blur_p=0.5)


def byol_views(image_size: int, scale: tuple[float, float]) -> list[Recipe]:
    """BYOL's two asymmetric views (MoCo v3's, DINO's global crops): blur p 1.0 / 0.1, solarize
    p 0 / 0.2, both with BYOL_COLOR."""
    return [Recipe(image_size, scale=scale, blur_p=1.0, solarize_p=0.0, **BYOL_COLOR),
            Recipe(image_size, scale=scale, blur_p=0.1, solarize_p=0.2, **BYOL_COLOR)]


# ----------------------------------------------------------------------------------------------
# Momentum encoders (MoCo, BYOL, DINO, SimCLR v2's memory)
# ----------------------------------------------------------------------------------------------
def momentum_copy(*online: nn.Module) -> nn.Sequential:
    """The momentum (key / target / teacher) encoder: a copy of nn.Sequential(*online) that gets
    no gradient; ``momentum_follow`` moves it towards the online modules after each step."""
    target = copy.deepcopy(nn.Sequential(*online))
    target.requires_grad_(False)
    return target


def momentum_follow(target: nn.Module, *online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * nn.Sequential(*online), every parameter
    (fastcl.momentum_update: a few fused launches, no host sync)."""
    fastcl.momentum_update(target, nn.Sequential(*online), momentum)


# ----------------------------------------------------------------------------------------------
# Memory-bank methods (InstDisc, CMC)
# ----------------------------------------------------------------------------------------------
class BankMethod(Method):
    """What InstDisc and CMC share: per anchor, its own bank row and ``num_negatives`` (K) rows
    drawn uniformly with replacement from the step's generator (so a resumed run draws what the
    uninterrupted one would have), scored by the softmax cross-entropy over the K + 1 rows
    (loss="softmax", fastcl.sampled_info_nce) or InstDisc's NCE with its frozen Z (loss="nce",
    fastcl.InstDiscNCELoss); the banks are updated after the optimizer step from that step's
    features, as InstDisc's code does after computing the gradient."""

    batch_extras = ("indices",)
    LOSSES = ("nce", "softmax")
    HPARAMS = {
        "temperature": (0.07, "temperature tau of the bank logits"),
        "feat_dim": (128, "embedding and bank-row dimension"),
        "num_negatives": (4096, "bank rows K drawn per anchor (uniform, with replacement)"),
        "loss": ("softmax", "softmax (cross-entropy over the K + 1 logits) or nce (InstDisc's "
                            "NCE, Z frozen after the first batch)"),
        "bank_momentum": (0.5, "memory-bank update v <- n(m v + (1 - m) f)"),
        "min_scale": min_scale_hparam(0.2),
    }

    def __init__(self, backbone: nn.Module, **kw: Any):
        super().__init__(backbone, **kw)
        if self.num_items < 1:
            raise ValueError(f"{self.name} needs num_items >= 1, the number of training images "
                             f"(one memory-bank row each), got {self.num_items}")
        self.check_choice("loss", self.LOSSES)
        if self.hparams["num_negatives"] < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.hparams['num_negatives']}")
        self._pending_update: Optional[tuple[Tensor, list[tuple[nn.Module, Tensor]]]] = None

    def nce_loss(self) -> Optional[nn.Module]:
        """A fresh InstDiscNCELoss (its own Z) for loss="nce", else None."""
        if self.hparams["loss"] != "nce":
            return None
        return fastcl.InstDiscNCELoss(self.num_items, self.hparams["temperature"])

    def draw_negatives(self, images: Tensor, g: torch.Generator) -> Tensor:
        """(B, K) int64 bank rows for the B images, uniform with replacement, from g."""
        shape = (images.shape[0], self.hparams["num_negatives"])
        return torch.randint(0, self.num_items, shape, generator=g, device=images.device)

    def bank_rows(self, indices: Optional[Tensor], negatives: Tensor, batch: int) -> Tensor:
        """(B, K + 1) rows: column 0 each anchor's own row (indices (B,)), then its negatives."""
        if indices is None:
            raise ValueError(f"{self.name} needs indices=, the (B,) training-set rows of the "
                             f"batch (its memory-bank rows)")
        if indices.shape != (batch,):
            raise ValueError(f"indices must have shape ({batch},), one per image, got "
                             f"{tuple(indices.shape)}")
        return torch.cat([indices[:, None], negatives], dim=1)

    def bank_loss(self, f: Tensor, bank: Tensor, rows: Tensor,
                  nce: Optional[nn.Module]) -> Tensor:
        """f (B, D) against the bank rows `rows`: through `nce` when given, else softmax CE."""
        if nce is not None:
            return nce(f, bank, rows)
        return fastcl.sampled_info_nce(f, bank, rows, self.hparams["temperature"])

    def update_after_step(self, indices: Tensor, *updates: tuple[nn.Module, Tensor]) -> None:
        """Keeps (memory bank, features (B, D)) pairs for after_step, in training only."""
        if self.training:
            self._pending_update = (indices, [(bank, f.detach()) for bank, f in updates])

    def after_step(self, step: int, total_steps: int) -> None:
        if self._pending_update is not None:
            indices, updates = self._pending_update
            for bank, f in updates:
                bank.update(indices, f, gather=self.gather)
            self._pending_update = None
