"""CMC (Tian et al. 2019, contrastive multiview coding): two views of a crop, one encoder each, each
view's embedding scored against the other view's memory bank, through fastcl.MemoryBank and the
sampled-negative ops.

Views of color images: the L channel and the ab channels of the crop in CIE Lab
(fastcl.color.rgb_to_lab, each channel scaled to about [-1, 1]); an L encoder (1 input channel)
and an ab encoder (2). Gray images have no ab: their two views are two independent crops of the
intensity (the same crop and flip augmentation), one encoder each, which keeps CMC's two-encoder,
two-bank form.

With f_1 = n(fc_1(enc_1(view_1))), f_2 likewise, and rows (B, K + 1) = [own row, K uniform draws],
the same for both views:

    L = l(f_1 vs bank_2[rows]) + l(f_2 vs bank_1[rows])

where l is the softmax cross-entropy over the K + 1 logits (loss="softmax", CMC's --softmax:
fastcl.sampled_info_nce) or InstDisc's NCE (loss="nce", the paper's and the code's default: a
separate Z per view, estimated on the first batch and frozen: fastcl.InstDiscNCELoss). The default
here is softmax: on a small data set the similarities soon outgrow the frozen Z and the NCE loss
diverges (see InstDisc). Both banks are updated after the step with momentum 0.5 from that step's
embeddings (the plumbing InstDisc shares: base.BankMethod). CMC's code draws K = 16384 negatives
(its README says 4096); the default here is 4096.

Evaluation (``method.backbone``): images normalized with the data's statistics -> the two
encoders' features concatenated (B, 2 d), as CMC's linear evaluation of L + ab. Each encoder has
the width given to the trainer (CMC halves the width per view: pass --width 0.5 for that).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl.augment import Recipe
from fastcl.color import normalized_lab
from fastcl.methods.base import BankMethod, Method


def with_in_channels(backbone: nn.Module, in_channels: int) -> nn.Module:
    """A copy of backbone whose first convolution (the ResNet stem, the ViT patch embedding) takes
    `in_channels` channels (a freshly initialized convolution when the count changes)."""
    encoder = copy.deepcopy(backbone)
    name, conv = next((n, m) for n, m in encoder.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels != in_channels:
        parent_name, _, attr = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        setattr(parent, attr, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size,
                                        conv.stride, conv.padding, bias=conv.bias is not None))
    return encoder


class SplitEncoders(nn.Module):
    """CMC's evaluation encoder: images (B, C, H, W), normalized with the data's mean and std ->
    [enc_1(view_1), enc_2(view_2)] concatenated, (B, 2 d). Color: views L and ab of the image;
    gray: both encoders see the image."""

    def __init__(self, first: nn.Module, second: nn.Module, mean: Sequence[float],
                 std: Sequence[float]):
        super().__init__()
        self.first, self.second = first, second
        self.color = len(mean) == 3
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)
        self.out_dim = 2 * first.out_dim

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized images (B, C, H, W) -> (L (B, 1, H, W), ab (B, 2, H, W)), each about in
        [-1, 1]; gray images -> (x, x)."""
        if not self.color:
            return x, x
        lab = normalized_lab(x.float() * self.std + self.mean).to(x.dtype)
        return lab[:, :1], lab[:, 1:]

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.split(x)
        return torch.cat([self.first(a), self.second(b)], dim=1)


class CMC(BankMethod):
    """CMC: L and ab views, one encoder and one memory bank each (NCE or softmax)."""

    name = "cmc"
    HPARAMS = {
        **BankMethod.HPARAMS,
        "temperature": (0.1, "temperature tau of the bank logits (CMC's code: 0.07 on ImageNet, "
                             "0.1 on STL-10's small images)"),
        "num_negatives": (4096, "bank rows K drawn per anchor (16384 in CMC's code)"),
        "loss": ("softmax", "softmax (cross-entropy over the K + 1 logits, CMC's --softmax) or "
                            "nce (the paper's: InstDisc's NCE, one frozen Z per view)"),
    }
    DEFAULTS = {**Method.DEFAULTS, "epochs": 15}  # CMC: SGD lr 0.03, 240 epochs

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        mean, std = self.recipes[0].mean, self.recipes[0].std
        if len(mean) == 3:
            first, second = with_in_channels(backbone, 1), with_in_channels(backbone, 2)
        else:
            first, second = backbone, with_in_channels(backbone, len(mean))
        self.backbone = SplitEncoders(first, second, mean, std)
        d = first.out_dim
        self.heads = nn.ModuleList([nn.Linear(d, hp["feat_dim"]), nn.Linear(d, hp["feat_dim"])])
        self.memories = nn.ModuleList([
            fastcl.MemoryBank(self.num_items, hp["feat_dim"], momentum=hp["bank_momentum"])
            for _ in range(2)])
        self.nce = (nn.ModuleList([self.nce_loss() for _ in range(2)])
                    if hp["loss"] == "nce" else None)

    def view_recipes(self, image_size: int) -> list[Recipe]:
        # Crop and flip only.
        return self.same_views(image_size, count=1, jitter_p=0.0, gray_p=0.0, blur_p=0.0)

    def augment(self, images: Tensor, g: torch.Generator) -> list[Tensor]:
        """[crop(s) (B, C, s, s): one for color images (split into L and ab), two for gray,
        negatives (B, K) int64 bank rows drawn from g]."""
        crops = [self.recipes[0](images, g) for _ in range(1 if self.backbone.color else 2)]
        return crops + [self.draw_negatives(images, g)]

    def _score(self, i: int, f: Tensor, rows: Tensor) -> Tensor:
        """View i's embeddings f (B, feat_dim) against the other view's bank."""
        return self.bank_loss(f, self.memories[1 - i].tensor, rows,
                              None if self.nce is None else self.nce[i])

    def forward(self, views: list[Tensor], *, epoch: int = 0,
                indices: Optional[Tensor] = None) -> Tensor:
        *crops, negatives = views
        rows = self.bank_rows(indices, negatives, crops[0].shape[0])
        inputs = self.backbone.split(crops[0]) if self.backbone.color else crops
        encoders = (self.backbone.first, self.backbone.second)
        f = [head(enc(x)) for head, enc, x in zip(self.heads, encoders, inputs)]
        f = [F.normalize(e.to(torch.promote_types(e.dtype, torch.float32)), dim=1) for e in f]
        loss = self._score(0, f[0], rows) + self._score(1, f[1], rows)
        self.update_after_step(indices, (self.memories[0], f[0]), (self.memories[1], f[1]))
        return loss
