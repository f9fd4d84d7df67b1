"""Backbones for small images and the MLP heads the methods put on top of them.

Written here with plain torch (no torchvision, no timm):

- ResNet-18 / ResNet-50 with the small-image stem of the CIFAR SSL recipes: a 3x3 stride-1 first
  convolution and no max-pool, so an 8x8 or 32x32 input keeps its resolution into the first stage;
  or (stem="imagenet") torchvision's 7x7 stride-2 convolution and 3x3 stride-2 max-pool, which
  bring a 224 px image to 56 px before the first stage (the ImageNet recipes' ResNet-50).
  ``width`` scales every stage's channels (64 * width in the first stage).
- A small ViT (pre-norm transformer blocks, class token, learned position embeddings, a mask token
  for masked image modelling) whose patch size adapts to the image side.

Every backbone maps images (B, C, H, W) to features (B, backbone.out_dim); heads map features on.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------
# ResNet with a small-image stem
# ----------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.shortcut = _shortcut(in_ch, ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """ResNet: (B, C, H, W) -> (B, out_dim). stem "small": a 3x3 stride-1 convolution and no
    max-pool (small images); "imagenet": a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool
    (H / 4 into the first stage)."""

    def __init__(self, block: type, layers: Sequence[int], in_channels: int = 3,
                 width: float = 1.0, stem: str = "small"):
        super().__init__()
        if stem not in ("small", "imagenet"):
            raise ValueError(f"stem must be 'small' or 'imagenet', got {stem!r}")
        channels = [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]
        kernel, stride = (3, 1) if stem == "small" else (7, 2)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
            *([nn.MaxPool2d(3, 2, 1)] if stem == "imagenet" else []),
        )
        stages, in_ch = [], channels[0]
        for i, (ch, blocks) in enumerate(zip(channels, layers)):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(block(in_ch, ch, stride))
                in_ch = ch * block.expansion
        self.stages = nn.Sequential(*stages)
        self.out_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------
# Small ViT
# ----------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer for small images: (B, C, H, W) -> (B, dim), the class token's output.

    Patches of `patch_size` pixels (default image_size // 8, at least 2: an 8x8 grid of tokens,
    e.g. 4 px patches of a 32 px image, or a coarser grid of 2 px patches under 16 px; a 1 px patch
    holds one colour, so a random-init ViT sees little more than the image's bag of colours: kNN
    top-1 0.25 on the 8 px digits, 0.44 with 2 px patches) embedded by a strided convolution, a
    class token, learned position embeddings of the patches on the image_size grid, interpolated
    (bilinear; DINOv2 bicubic) for images of another side (multi-crop), pre-norm blocks and a
    final LayerNorm.
    ``tokens`` returns the class token and the patch tokens, and replaces masked patches by a
    learned mask token before the position embeddings (DINOv2's masked image modelling).
    """

    def __init__(self, image_size: int, in_channels: int = 3, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp_ratio: float = 4.0, patch_size: Optional[int] = None):
        super().__init__()
        self.patch = patch_size or min(image_size, max(2, image_size // 8))
        if not 1 <= self.patch <= image_size:
            raise ValueError(f"patch_size must be from 1 to image_size = {image_size}, got "
                             f"{patch_size}")
        self.embed = nn.Conv2d(in_channels, dim, self.patch, self.patch)
        grid = image_size // self.patch
        self.pos = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def grid(self, side: int) -> int:
        """Patches per side of a side x side image."""
        return side // self.patch

    def tokens(self, x: Tensor, masks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) -> (class token (B, dim), patch tokens (B, h * w, dim)), normalized.
        masks: (B, h * w) bool, True where the patch is replaced by the mask token."""
        patches = self.embed(x)  # (B, dim, h, w)
        grid = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, h * w, dim)
        if masks is not None:
            if masks.shape != patches.shape[:2] or masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor of shape {tuple(patches.shape[:2])} "
                                 f"(images, patches), got {masks.dtype} {tuple(masks.shape)}")
            patches = torch.where(masks[..., None], self.mask_token.to(patches.dtype), patches)
        pos = self.pos
        if pos.shape[-2:] != grid:
            pos = nn.functional.interpolate(pos, size=grid, mode="bilinear", align_corners=False)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1),
                            patches + pos.flatten(2).transpose(1, 2)], dim=1)
        tokens = self.norm(self.blocks(tokens))
        return tokens[:, 0], tokens[:, 1:]

    def forward(self, x: Tensor) -> Tensor:
        return self.tokens(x)[0]


# ----------------------------------------------------------------------------------------------
# Registry and heads
# ----------------------------------------------------------------------------------------------
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda in_channels, image_size, width: ResNet(BasicBlock, (2, 2, 2, 2),
                                                              in_channels, width),
    "resnet50": lambda in_channels, image_size, width: ResNet(Bottleneck, (3, 4, 6, 3),
                                                              in_channels, width),
    "vit_small": lambda in_channels, image_size, width: ViT(
        image_size, in_channels, dim=max(24, int(round(192 * width / 24)) * 24)),
}


def build_backbone(name: str, *, in_channels: int = 3, image_size: int = 32,
                   width: float = 1.0) -> nn.Module:
    """A backbone by name (see ``BACKBONES``); width scales its channels (ViT: its dimension)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return BACKBONES[name](in_channels, image_size, width)


def mlp(dims: Sequence[int], *, batch_norm: bool = True, last_batch_norm: bool = False,
        last_affine: bool = True, last_bias: bool = True,
        activation: type = nn.ReLU) -> nn.Sequential:
    """Linear layers dims[0] -> ... -> dims[-1]; hidden layers get BatchNorm (optional) and the
    activation, the last one optionally a BatchNorm (affine or not). Linear layers followed by
    BatchNorm have no bias; last_bias=False drops the last one's in any case (MoCo v3's
    predictor)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (batch_norm and not last) and
                                not (last and (last_batch_norm or not last_bias))))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(activation())
        elif last_batch_norm:
            layers.append(nn.BatchNorm1d(b, affine=last_affine))
    return nn.Sequential(*layers)
