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
the method's trainer defaults (optimizer, lr, batch size, ...) scaled to small images.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from fastcl.augment import Recipe, crop_scale


# The help text of a crop-size hyper-parameter: how Method.crop_range raises it on small images.
CROP_FLOOR_HELP = "raised so crops keep >= 6 px on the digits, 10 px on digits-shift"


def min_scale_hparam(default: float) -> tuple[float, str]:
    """The ``min_scale`` entry of a method's HPARAMS: (default, help)."""
    return default, f"smallest random-resized-crop area fraction ({CROP_FLOOR_HELP})"


class Method(nn.Module):
    name: ClassVar[str]
    HPARAMS: ClassVar[dict[str, tuple[Any, str]]] = {}
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    # Per-batch keyword arguments forward needs from the trainer, among "indices" and "labels".
    batch_extras: ClassVar[tuple[str, ...]] = ()

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
        # Under torch.distributed, the losses see every rank's embeddings.
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
