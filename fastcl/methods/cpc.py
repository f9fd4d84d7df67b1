"""CPC v2 (van den Oord et al. 2018; Henaff et al. 2019): contrastive predictive coding over a grid
of image patches, through fastcl.info_nce with normalize=False.

Images smaller than ``min_side`` (16) are first upsampled (bilinear) to it (not in CPC, whose
patches are 64 px: cut from an 8 px digit, 4 px patches leave the ResNet's stages at 1 x 1 and it
learns nothing). The image of side s is then cut into a ``grid`` x ``grid`` grid of overlapping
patches (CPC: 7 x 7 patches of 64 px with 32 px overlap at 256 px; scaled here to s: patches of
2s / (grid + 1) px, half-overlapping, so 3 x 3 patches of 8 px at 16 px). The backbone encodes
each patch to z (B, d, grid, grid), with LayerNorm in place of BatchNorm (v2: BatchNorm leaks
information between the patches of an image): every BatchNorm2d of the backbone becomes a
GroupNorm with one group, LayerNorm over (C, H, W). z is the pooled output through a LayerNorm
over its d channels without affine (not in CPC: the loss is blind to an offset shared by every
z, which otherwise grows until all features are alike).

A masked context network (PixelCNN-like: each convolution sees the current row and those above,
never below) gives c over the grid. For offsets k = 1..``steps`` the prediction W_k c_{i,j} of
z_{i+k,j} is scored against every target patch of the batch at that offset:

    L_k = -mean log [ exp(z_{i+k,j} . W_k c_{i,j}) / sum_{targets t} exp(z_t . W_k c_{i,j}) ]

raw dot products, no temperature (fastcl.info_nce(pred, target, temperature=1, normalize=False)).
v2 predicts in all four directions (``directions`` = 4: the grid rotated by 0, 90, 180 and 270
degrees through the same context network, one W_k per direction and offset); 1 gives CPC v1's
top-to-bottom only. L is the mean of the L_k over directions and offsets.

Augmentation: a random crop (scale ``min_scale``-1) and flip of the image, then per-patch
augmentations (v2): a random crop of each patch (``patch_min_scale``-1), color jitter and
grayscale ("color dropping").

Evaluation (``method.backbone``): images -> the same upsampling and patch grid, without the
random parts -> patch features averaged over the grid, (B, d) (CPC v2 trains a ResNet on the
(d, grid, grid) features; the mean keeps the trainer's linear probe and kNN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl.augment import Recipe, random_resized_crop
from fastcl.methods.base import Method


def batch_norm_to_layer_norm(module: nn.Module) -> nn.Module:
    """Replaces, in place, every BatchNorm2d by GroupNorm(1, C) (LayerNorm over C, H, W with a
    per-channel affine); returns module."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            batch_norm_to_layer_norm(child)
    return module


def patch_geometry(image_size: int, grid: int) -> tuple[int, int]:
    """(patch side, stride) of a grid x grid grid of half-overlapping patches on an image side."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an int >= 2, got {grid!r}")
    patch = 2 * image_size // (grid + 1)
    stride = patch // 2
    if patch < 2 or (grid - 1) * stride + patch > image_size:
        raise ValueError(f"grid {grid} does not fit {image_size} px images: half-overlapping "
                         f"patches of at least 2 px need image_size >= grid + 1")
    return patch, stride


def to_patches(x: Tensor, patch: int, stride: int) -> Tensor:
    """x (B, C, H, W) -> (B, G, G, C, patch, patch), row-major over the G x G grid."""
    tiles = x.unfold(2, patch, stride).unfold(3, patch, stride)  # (B, C, G, G, p, p)
    return tiles.permute(0, 2, 3, 1, 4, 5).contiguous()


def upsample(x: Tensor, side: int) -> Tensor:
    """(B, C, H, W) -> (B, C, side, side), bilinear (the identity at the image's own side)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


class PatchGridEncoder(nn.Module):
    """The patch encoder as an image encoder: images (B, C, H, W) are resized to side x side and
    cut into the patch grid; ``encode_patches`` gives the per-patch features (B, d, G, G),
    forward their mean over the grid (B, d) (evaluation)."""

    def __init__(self, encoder: nn.Module, side: int, patch: int, stride: int):
        super().__init__()
        self.encoder, self.side, self.patch, self.stride = encoder, side, patch, stride
        self.out_dim = encoder.out_dim
        self.norm = nn.LayerNorm(self.out_dim, elementwise_affine=False)

    def patches(self, x: Tensor) -> Tensor:
        """images (B, C, H, W) -> the patch grid (B, G, G, C, patch, patch) of training's
        geometry (the same resize and cut as ``CPC.augment`` without its random parts)."""
        return to_patches(upsample(x, self.side), self.patch, self.stride)

    def encode_patches(self, patches: Tensor) -> Tensor:
        """patches (B, G, G, C, p, p) -> z (B, d, G, G)."""
        b, g = patches.shape[:2]
        z = self.norm(self.encoder(patches.flatten(0, 2)))  # one batch of B * G * G patches
        return z.view(b, g, g, -1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.encode_patches(self.patches(x)).mean(dim=(2, 3))


class MaskedConv(nn.Module):
    """3 x 3 convolution over (B, C, G, G) whose output row i sees input rows i - 2..i only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, (3, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (1, 1, 2, 0)))  # (left, right, top, bottom): nothing below


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each grid position of (B, C, H, W): unlike a LayerNorm over
    (C, H, W), it mixes nothing between positions, so the context stays causal."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ContextNetwork(nn.Module):
    """Residual blocks of LayerNorm, ReLU and a masked convolution: c_{i,j} summarizes the
    rows <= i of z (the PixelCNN-style context of CPC)."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(ChannelLayerNorm(channels), nn.ReLU(), MaskedConv(channels))
            for _ in range(layers))

    def forward(self, z: Tensor) -> Tensor:
        c = z
        for block in self.blocks:
            c = c + block(c)
        return c


class CPC(Method):
    """CPC v2: patch grid, masked context network, InfoNCE predictions in four directions."""

    name = "cpc"
    HPARAMS = {
        "grid": (3, "patches per side (7 at 256 px; half-overlapping patches)"),
        "steps": (2, "offsets k = 1..steps predicted (at most grid - 1)"),
        "directions": (4, "4: predictions in all four directions (v2); 1: top to bottom (v1)"),
        "context_layers": (2, "residual masked-convolution blocks of the context network"),
        "min_side": (16, "images smaller than this are upsampled (bilinear) to it before the grid "
                         "(not in CPC: 4 px patches of 8 px digits give the encoder nothing)"),
        "min_scale": (0.5, "smallest crop area fraction of the image"),
        "patch_min_scale": (0.6, "smallest crop area fraction of each patch"),
    }
    # A quarter-width backbone (each image is grid x grid patches), batch 64 and lr 3e-3 for
    # enough steps (docs/methods.md). CPC v2 trains with Adam for hundreds of epochs.
    DEFAULTS = {**Method.DEFAULTS, "lr": 3e-3, "batch_size": 64, "epochs": 20, "width": 0.25}

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        side = max(self.image_size, hp["min_side"])
        patch, stride = patch_geometry(side, hp["grid"])
        if not 1 <= hp["steps"] <= hp["grid"] - 1:
            raise ValueError(f"steps must lie in [1, grid - 1 = {hp['grid'] - 1}], got "
                             f"{hp['steps']}")
        self.check_choice("directions", (1, 4))
        if hp["context_layers"] < 1:
            raise ValueError(f"context_layers must be >= 1, got {hp['context_layers']}")
        self.backbone = PatchGridEncoder(batch_norm_to_layer_norm(backbone), side, patch, stride)
        d = backbone.out_dim
        self.context = ContextNetwork(d, hp["context_layers"])
        # W_k per (direction, offset): (directions, steps, d, d), applied as c @ W. Initialized
        # small: unit-variance W gives raw-dot-product logits of tens at the start (a loss of ~25
        # against log N ~ 6) and the first epochs only undo that.
        self.predictors = nn.Parameter(
            torch.randn(hp["directions"], hp["steps"], d, d) * 0.1 / d ** 0.5)

    def view_recipes(self, image_size: int) -> list[Recipe]:
        """[the image crop and flip, the per-patch augmentations] (one view, in augment)."""
        side = max(image_size, self.hparams["min_side"])
        patch = patch_geometry(side, self.hparams["grid"])[0]
        image = Recipe(side, scale=self.crop_range((self.hparams["min_scale"], 1.0)))
        return [image, Recipe(patch, scale=(self.hparams["patch_min_scale"], 1.0), flip_p=0.0,
                              jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.25,
                              blur_p=0.0)]

    def augment(self, images: Tensor, g: torch.Generator) -> list[Tensor]:
        """[patches (B, G, G, C, p, p)]: an image crop and flip, then per-patch augmentations."""
        image, patch = self.recipes
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = random_resized_crop(x, image.size, g, scale=image.scale, flip_p=image.flip_p)
        patches = to_patches(x, self.backbone.patch, self.backbone.stride)
        flat = patch(patches.flatten(0, 2), g)
        return [flat.view(patches.shape[:3] + flat.shape[1:])]

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        z = self.backbone.encode_patches(views[0])  # (B, d, G, G)
        losses = []
        for direction in range(self.hparams["directions"]):
            zr = torch.rot90(z, direction, dims=(2, 3))  # predict "down" the rotated grid
            c = self.context(zr)
            for k in range(1, self.hparams["steps"] + 1):
                context = c[:, :, :-k].permute(0, 2, 3, 1).flatten(0, 2)  # (B (G - k) G, d)
                target = zr[:, :, k:].permute(0, 2, 3, 1).flatten(0, 2)
                prediction = (context @ self.predictors[direction, k - 1].to(context.dtype)
                              ).to(target.dtype)
                losses.append(fastcl.info_nce(prediction, target, temperature=1.0,
                                              normalize=False, gather=self.gather))
        return torch.stack(losses).mean()
