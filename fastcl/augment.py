"""Batched augmentations on the training device, with per-sample random parameters.

Every transform takes images (B, C, H, W) as floats in [0, 1] (C = 1 or 3) and a
``torch.Generator`` on the images' device, draws one set of parameters per sample and applies them
to the whole batch in a few tensor ops: crop and flip are one ``grid_sample``, color jitter is per-
sample affine maps, the blur a grouped convolution. Nothing runs per image on the host.

``Recipe`` bundles one view's pipeline (the methods' recipes follow each method's paper and
official code, scaled to small images; docs/methods.md lists them); ``Recipe.__call__`` maps
uint8 or float images to normalized float views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Luma weights of ITU-R BT.601, as PIL's and torchvision's grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _coin(n: int, p: float, g: torch.Generator, device) -> Tensor:
    """(n,) bool: True with probability p."""
    return torch.rand(n, generator=g, device=device) < p


def _per_sample(mask: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting against images."""
    return mask.view(-1, *([1] * (x.dim() - 1)))


def random_resized_crop(x: Tensor, size: int, g: torch.Generator, *,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip_p: float = 0.5) -> Tensor:
    """Crop of a random area fraction in `scale` and aspect ratio in `ratio` (log-uniform),
    resized to size x size (bilinear) and mirrored with probability flip_p: (B, C, H, W) ->
    (B, C, size, size). Crops larger than the image are shrunk to fit (torchvision retries, then
    falls back to a center crop; shrinking keeps the draw one-shot)."""
    b, device = x.shape[0], x.device
    area = _uniform(b, *scale, g, device)
    log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), g, device)
    aspect = torch.exp(log_ratio)
    # Sides as fractions of the image's width and height.
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, generator=g, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=g, device=device) * 2 - 1) * (1 - h)
    flip = torch.where(_coin(b, flip_p, g, device), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma."""
    if x.shape[1] == 1:
        return x
    r, gch, bch = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * gch + _LUMA[2] * bch).unsqueeze(1)


def _hue_rotation(angle: Tensor) -> Tensor:
    """(B,) angles in radians -> (B, 3, 3) RGB matrices rotating the hue about the gray axis
    (in YIQ space: a linear hue shift, close to HSV's and much cheaper)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]], device=angle.device, dtype=angle.dtype)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(angle.shape[0], 3, 3, device=angle.device, dtype=angle.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def color_jitter(x: Tensor, g: torch.Generator, *, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1,
                 p: float = 0.8) -> Tensor:
    """With probability p per sample: brightness, contrast and saturation factors drawn from
    [1 - s, 1 + s], hue shifted by up to +-hue of a turn, in that order (torchvision draws a
    random order; a fixed one keeps the batch in four ops). Gray images get brightness and
    contrast only."""
    b, device = x.shape[0], x.device
    apply = _per_sample(_coin(b, p, g, device), x)
    out = x
    if brightness > 0:
        f = _uniform(b, max(0.0, 1 - brightness), 1 + brightness, g, device)
        out = (out * _per_sample(f, x)).clamp(0, 1)
    if contrast > 0:
        f = _per_sample(_uniform(b, max(0.0, 1 - contrast), 1 + contrast, g, device), x)
        mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
        out = (f * out + (1 - f) * mean).clamp(0, 1)
    if x.shape[1] == 3 and saturation > 0:
        f = _per_sample(_uniform(b, max(0.0, 1 - saturation), 1 + saturation, g, device), x)
        out = (f * out + (1 - f) * _gray(out)).clamp(0, 1)
    if x.shape[1] == 3 and hue > 0:
        rot = _hue_rotation(_uniform(b, -hue, hue, g, device) * 2 * math.pi).to(x.dtype)
        out = torch.einsum("bij,bjhw->bihw", rot, out).clamp(0, 1)
    return torch.where(apply, out, x)


def random_grayscale(x: Tensor, g: torch.Generator, p: float = 0.2) -> Tensor:
    """Luma replicated over the channels with probability p per sample."""
    if x.shape[1] == 1 or p <= 0:
        return x
    apply = _per_sample(_coin(x.shape[0], p, g, x.device), x)
    return torch.where(apply, _gray(x).expand_as(x), x)


def gaussian_blur(x: Tensor, g: torch.Generator, *, sigma: tuple[float, float] = (0.1, 2.0),
                  p: float = 0.5, kernel_fraction: float = 0.1) -> Tensor:
    """With probability p per sample, a separable Gaussian blur with sigma drawn from `sigma`
    (in pixels of a 224 px image, as SimCLR, scaled to this side) and a kernel of about
    kernel_fraction of the side (odd, at least 3)."""
    b, c, h, w = x.shape
    if p <= 0:
        return x
    device = x.device
    apply = _coin(b, p, g, device)
    side_scale = min(h, w) / 224
    sig = (_uniform(b, *sigma, g, device) * max(side_scale, 1 / 16)).clamp(min=1e-3)
    k = max(3, int(round(kernel_fraction * min(h, w))) // 2 * 2 + 1)
    offsets = torch.arange(k, device=device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-offsets.square() / (2 * sig.to(x.dtype).square()[:, None]))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, k)
    kernel = torch.where(apply[:, None], kernel, (offsets == 0).to(x.dtype))  # identity if not
    weight = kernel.repeat_interleave(c, 0)  # (B * C, k), one filter per channel of each sample
    y = F.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(y, weight.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


def random_solarize(x: Tensor, g: torch.Generator, p: float = 0.2,
                    threshold: float = 0.5) -> Tensor:
    """Pixels at or above threshold inverted, with probability p per sample."""
    if p <= 0:
        return x
    apply = _per_sample(_coin(x.shape[0], p, g, x.device), x)
    return torch.where(apply & (x >= threshold), 1 - x, x)


def crop_scale(scale: tuple[float, float], size: int, min_side: int) -> tuple[float, float]:
    """An area-fraction range for crops of a size x size image, its lower end raised so that the
    smallest crop still spans min_side pixels: the ImageNet ranges (e.g. 0.08-1) keep at least
    63 px of a 224 px image, but would leave 2 px of an 8 px digit."""
    low = min(1.0, max(scale[0], (min_side / size) ** 2))
    return low, max(low, scale[1])


@dataclass(frozen=True)
class Recipe:
    """One view's augmentation pipeline: crop + flip, color jitter, grayscale, blur, solarize,
    then normalization with the dataset's per-channel mean and std."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0
    mean: Optional[Sequence[float]] = field(default=None, compare=False)
    std: Optional[Sequence[float]] = field(default=None, compare=False)

    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> "Recipe":
        return replace(self, mean=tuple(mean), std=tuple(std))

    def __call__(self, images: Tensor, g: torch.Generator) -> Tensor:
        """images (B, C, H, W), uint8 or float in [0, 1] -> augmented, normalized float views
        (B, C, size, size)."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = random_resized_crop(x, self.size, g, scale=self.scale, flip_p=self.flip_p)
        if self.jitter_p > 0:
            b, c, s, h = self.jitter
            x = color_jitter(x, g, brightness=b, contrast=c, saturation=s, hue=h, p=self.jitter_p)
        x = random_grayscale(x, g, self.gray_p)
        x = gaussian_blur(x, g, p=self.blur_p)
        x = random_solarize(x, g, self.solarize_p)
        return normalize(x, self.mean, self.std)


def normalize(x: Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> Tensor:
    """(x - mean) / std per channel; identity when the statistics are not set."""
    if mean is None or std is None:
        return x
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def to_input(images: Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
             ) -> Tensor:
    """Un-augmented images (uint8 or [0, 1] floats) -> normalized float inputs (evaluation)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return normalize(x, mean, std)
