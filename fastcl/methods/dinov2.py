"""DINOv2 (Oquab et al. 2023): DINO's self-distillation on the class token, iBOT's masked-patch
distillation and the KoLeo regularizer, on a ViT (``--backbone vit_small`` by default).

Student = ViT + DINO head on every crop: 2 global crops (area 0.32-1) and ``num_local_crops``
local ones (0.05-0.32, at 96/224 of the side, none where even the largest would be under the data
set's smallest crop: on the digits and digits-shift). Teacher = a momentum copy of the ViT and the
heads, on the two global crops only, without masks and without gradient. Per step:

* masks: half of the 2B global-crop images (``mask_probability``) get block masks of their patch
  grid, the i-th of them a fraction drawn from the i-th of equal slices of ``mask_ratio_min`` ..
  ``mask_ratio_max``, shuffled over the images (DINOv2's collate_data_and_cast and
  MaskingGenerator, dinov2/data/collate.py and dinov2/data/masking.py: ``MaskingGenerator``
  below). The student's masked patches are replaced by the ViT's mask token.
* DINO: cross-entropy between the teacher's Sinkhorn-Knopp codes of the class tokens (epsilon =
  the teacher temperature, 3 iterations, all 2B rows together) and the student's softmax at
  ``student_temp``, averaged over the (teacher crop t, student crop s != t) pairs.
* iBOT: for each masked patch, the cross-entropy between the teacher's Sinkhorn-Knopp codes of
  that patch (all masked patches together) and the student's softmax; averaged per image over its
  masked patches (weight 1 / its mask count), then summed and divided by the 2B images. The head
  is the DINO head (DINOv2's ibot_separate_head=False) unless ``ibot_separate_head`` 1.
* KoLeo (fastcl.koleo) on the student's class tokens (the backbone's output, before the head),
  for each global crop separately, summed over the two.
* L = dino_loss_weight * DINO + ibot_loss_weight * iBOT + koleo_loss_weight * KoLeo
  (DINOv2's 1.0, 1.0, 0.1).

The teacher temperature warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp``; the
teacher follows the student with a cosine momentum from ``teacher_momentum`` to 1 per step; the
heads' last layers get no gradient during the first ``freeze_last_layer`` epochs and gradients are
clipped per parameter to ``clip_grad``, as in DINO. The heads are DINO's (fastcl.methods.dino):
MLP d -> h -> h -> bottleneck (GELU; BatchNorm after the hidden layers with ``bn_in_head``, the
class tokens and the masked patches each a batch of their own), n(), weight-normalized prototypes
whose norm is learnt (DINOv2's weight_g, ``norm_last_layer`` 0).

Where this departs from DINOv2's code: its DINO term divides the pairs' sum by
(n_global - 1) n_global + max(n_local n_global, 1), so with no local crops it is 2/3 of the pair
mean used here; no drop-path, layer scale or layer-wise learning-rate decay; the trainer's constant
weight decay (DINOv2: 0.04 -> 0.2 cosine); Sinkhorn-Knopp centering only (DINOv2's configs also
offer the running-mean center). The heads' last layers are fused with the losses
(fastcl.dino_head_loss, fastcl.ibot_patch_loss): the (crops, B, K) and (masked patches, K) logits
are never formed. The ViT's patches are at least 2 px (fastcl.models.ViT: a 4x4 grid on the 8 px
digits; 1 px patches did not learn them).

Official (ssl_default_config.yaml): K = 65536, head 2048 hidden, 256 bottleneck, tau_s 0.1,
tau_t 0.04 -> 0.07 over 30 epochs, teacher momentum 0.992, AdamW lr 4e-3 x sqrt(B / 1024), wd
0.04 -> 0.2, clip 3.0, 8 local crops, mask ratio 0.1-0.5 on half the images. The defaults here are
scaled to the digits as DINO's are (docs/methods.md, "DINO's defaults" and "DINOv2 on the
digits"): 128 prototypes, tau_s 0.2, a faster teacher (0.9), a 4-epoch temperature warm-up, BN in
the heads (``bn_in_head`` 1; DINOv2 has none), 80 epochs.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastcl
from fastcl import _checks
from fastcl.augment import Recipe
from fastcl.losses.dino import teacher_temp_schedule
from fastcl.methods.base import CROP_FLOOR_HELP, Method, momentum_copy, momentum_follow
from fastcl.methods.dino import DINOHead, clip_and_freeze, multi_crop_views
from fastcl.models import ViT


class MaskingGenerator:
    """DINOv2's block masking of a (height, width) patch grid (dinov2/data/masking.py): blocks of
    random area (min_num_patches .. what is left, at most max_num_patches) and aspect ratio
    (log-uniform in min_aspect .. 1 / min_aspect) are added until num_masking_patches patches are
    masked or a block adds nothing within 10 tries; a block is kept only if it adds from 1 to
    max_mask_patches new patches. Draws from `rng` (a random.Random) in DINOv2's order."""

    def __init__(self, height: int, width: int, *, min_num_patches: int = 4,
                 max_num_patches: float, min_aspect: float = 0.3):
        self.height, self.width = height, width
        self.min_num_patches, self.max_num_patches = min_num_patches, max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: Tensor, max_mask_patches: float, rng: random.Random) -> int:
        """Masks one block of mask (height, width) bool in place; returns the patches it added."""
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block.fill_(True)
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches: int, rng: random.Random) -> Tensor:
        """(height, width) bool mask of about num_masking_patches patches (never more)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            delta = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches),
                                    rng)
            if delta == 0:
                break
            count += delta
        return mask


def batch_masks(generator: MaskingGenerator, images: int, ratio: tuple[float, float],
                probability: float, rng: random.Random) -> Tensor:
    """(images, height * width) bool masks as DINOv2's collate_data_and_cast draws them: the first
    int(images * probability) masks cover N * uniform(p_i, p_i+1) patches for the consecutive
    slices p of linspace(ratio, count + 1), the others none, in a shuffled order."""
    n = generator.height * generator.width
    masked = int(images * probability)
    probs = torch.linspace(ratio[0], ratio[1], masked + 1).tolist()
    masks = [generator(int(n * rng.uniform(probs[i], probs[i + 1])), rng) for i in range(masked)]
    masks += [generator(0, rng) for _ in range(masked, images)]
    rng.shuffle(masks)
    return torch.stack(masks).flatten(1)


class DINOv2(Method):
    """DINOv2: DINO on the class token, iBOT on masked patches, KoLeo, on a ViT."""

    name = "dinov2"
    HPARAMS = {
        "out_dim": (128, "prototypes K of the heads' last layers (65536 on ImageNet)"),
        "head_hidden": (512, "head MLP hidden width (2048 on ImageNet)"),
        "bottleneck": (128, "head bottleneck before the last layer (256 on ImageNet)"),
        "bn_in_head": (1, "1: BatchNorm after the heads' hidden layers (DINOv2 has none: 0; "
                          "the digits learn faster with it, as DINO's do)"),
        "norm_last_layer": (0, "1: the prototypes' norm stays 1; 0: learnt (DINOv2's weight_g)"),
        "ibot_separate_head": (0, "1: iBOT gets its own head (DINOv2's default 0: the DINO head)"),
        "dino_loss_weight": (1.0, "weight of the DINO class-token loss"),
        "ibot_loss_weight": (1.0, "weight of the iBOT masked-patch loss"),
        "koleo_loss_weight": (0.1, "weight of KoLeo on the student's class tokens"),
        "mask_probability": (0.5, "fraction of the global-crop images that get masks"),
        "mask_ratio_min": (0.1, "smallest fraction of a masked image's patches"),
        "mask_ratio_max": (0.5, "largest fraction of a masked image's patches"),
        "student_temp": (0.2, "student softmax temperature (0.1 on ImageNet)"),
        "teacher_temp": (0.07, "teacher temperature (Sinkhorn epsilon) after the warm-up"),
        "warmup_teacher_temp": (0.04, "teacher temperature at epoch 0"),
        "warmup_teacher_temp_epochs": (4, "epochs of the linear teacher-temperature warm-up"),
        "teacher_momentum": (0.9, "base teacher momentum, cosine to 1 (0.992 on ImageNet)"),
        "freeze_last_layer": (1, "epochs during which the heads' last layers get no gradient"),
        "clip_grad": (3.0, "per-parameter gradient-norm clip (0: none)"),
        "num_local_crops": (8, "local crops per image; none where even the largest would be "
                               "under the data set's smallest crop that shows the object"),
        "global_scale": (0.32, f"smallest area fraction of the global crops ({CROP_FLOOR_HELP})"),
        "local_scale": (0.32, "largest area fraction of the local crops (smallest: 0.05, raised "
                              "like the global crops' floor)"),
    }
    # A ViT from scratch needs more epochs than DINO's ResNet (docs/methods.md, "DINOv2 on the
    # digits").
    DEFAULTS = {**Method.DEFAULTS, "backbone": "vit_small", "weight_decay": 0.04, "epochs": 80}

    def __init__(self, backbone, **kw):
        super().__init__(backbone, **kw)
        hp = self.hparams
        if not isinstance(backbone, ViT):
            raise ValueError(f"dinov2 needs a ViT backbone (--backbone vit_small): iBOT masks its "
                             f"patch tokens; got {type(backbone).__name__}")
        for name in ("norm_last_layer", "bn_in_head", "ibot_separate_head"):
            self.check_choice(name, (0, 1))
        for name in ("num_local_crops", "freeze_last_layer", "warmup_teacher_temp_epochs"):
            self.check_int(name, 0)
        for name in ("teacher_momentum", "mask_probability", "mask_ratio_min", "mask_ratio_max"):
            _checks.unit_interval(name, hp[name])
        if hp["mask_ratio_min"] > hp["mask_ratio_max"]:
            raise ValueError(f"mask_ratio_min must be <= mask_ratio_max, got "
                             f"{hp['mask_ratio_min']} > {hp['mask_ratio_max']}")
        for name in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight", "clip_grad"):
            if not hp[name] >= 0:
                raise ValueError(f"{name} must be >= 0, got {hp[name]}")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _checks.positive_scalar(name, hp[name], tensor=False)

        def head():
            return DINOHead(backbone.out_dim, hp["out_dim"], hp["head_hidden"], hp["bottleneck"],
                            learn_norm=not hp["norm_last_layer"], batch_norm=bool(hp["bn_in_head"]))

        self.head = head()
        if hp["ibot_separate_head"]:
            self.ibot_head = head()
        # The DINO head, then the iBOT head if separate: heads[-1] serves iBOT.
        self.heads = [self.head, self.ibot_head] if hp["ibot_separate_head"] else [self.head]
        # teacher[0]: the ViT, teacher[1]: the DINO head, teacher[2]: the iBOT head if separate.
        self.teacher = momentum_copy(backbone, *self.heads)
        grid = backbone.grid(self.image_size)
        # DINOv2's train.py: at most half the grid per block, blocks of at least 4 patches.
        self.mask_generator = MaskingGenerator(grid, grid, max_num_patches=0.5 * grid * grid)
        self.teacher_temps = teacher_temp_schedule(
            hp["warmup_teacher_temp"], hp["teacher_temp"], hp["warmup_teacher_temp_epochs"],
            hp["warmup_teacher_temp_epochs"]).tolist()

    def view_recipes(self, image_size: int) -> list[Recipe]:
        return multi_crop_views(self, image_size)

    def augment(self, images: Tensor, g: torch.Generator) -> list[Tensor]:
        """The views of the recipes, then the (2B, patches) bool masks of the two global crops
        (the first B rows for the first crop), drawn from a seed that g gives."""
        views = super().augment(images, g)
        hp = self.hparams
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=g, device=g.device).item())
        masks = batch_masks(self.mask_generator, 2 * images.shape[0],
                            (hp["mask_ratio_min"], hp["mask_ratio_max"]), hp["mask_probability"],
                            random.Random(seed))
        return views + [masks.to(images.device)]

    def teacher_temperature(self, epoch: int) -> float:
        temps = self.teacher_temps
        return temps[epoch] if epoch < len(temps) else self.hparams["teacher_temp"]

    def forward(self, views: list[Tensor], *, epoch: int = 0) -> Tensor:
        hp = self.hparams
        *crops, masks = views
        batch = crops[0].shape[0]
        if len(crops) < 2 or masks.shape[0] != 2 * batch or masks.dtype != torch.bool:
            raise ValueError("dinov2 expects the views that its augment returns: the crops, then "
                             "the (2B, patches) bool masks of the two global crops")
        teacher_temp = self.teacher_temperature(epoch)
        global_crops = torch.cat(crops[:2])
        student_cls, student_patches = self.backbone.tokens(global_crops, masks)
        cls = [student_cls]
        if len(crops) > 2:  # the local crops: one batch at their resolution, no masks
            cls.append(self.backbone(torch.cat(crops[2:])))
        with torch.no_grad():
            teacher_cls, teacher_patches = self.teacher[0].tokens(global_crops)

        # DINO on the class tokens, through the head's last layer fused with the loss: student
        # (S, B, H) and teacher (2, B, H) bottleneck features against the (K, H) prototypes.
        student = self.head.bottleneck(torch.cat(cls)).view(len(crops), batch, -1)
        with torch.no_grad():
            teacher = self.teacher[1].bottleneck(teacher_cls).view(2, batch, -1)
        dtype = student.dtype  # under autocast the prototypes stay float32
        dino = fastcl.dino_head_loss(student, teacher, self.head.prototypes().to(dtype),
                                     self.teacher[1].prototypes().to(dtype), None,
                                     hp["student_temp"], teacher_temp, centering="sinkhorn")

        # iBOT on the masked patches, each weighted 1 / its image's mask count.
        rows = masks.flatten().nonzero().squeeze(1)
        weights = (1.0 / masks.sum(1).clamp(min=1))[:, None].expand_as(masks).flatten()[rows]
        head, teacher_head = self.heads[-1], self.teacher[-1]
        student = head.bottleneck(student_patches.flatten(0, 1)[rows])
        if rows.numel():
            with torch.no_grad():
                teacher = teacher_head.bottleneck(teacher_patches.flatten(0, 1)[rows])
            ibot = fastcl.ibot_patch_loss(student, teacher, head.prototypes().to(dtype),
                                          teacher_head.prototypes().to(dtype), None, weights,
                                          hp["student_temp"], teacher_temp,
                                          n_images=masks.shape[0], centering="sinkhorn")
        else:  # no patch masked in this batch
            ibot = student.sum() * 0.0

        koleo = sum(fastcl.koleo(c) for c in student_cls.chunk(2))
        return (hp["dino_loss_weight"] * dino + hp["ibot_loss_weight"] * ibot
                + hp["koleo_loss_weight"] * koleo)

    def after_backward(self, epoch: int) -> None:
        clip_and_freeze(self, self.hparams["clip_grad"], self.heads,
                        epoch < self.hparams["freeze_last_layer"])

    def after_step(self, step: int, total_steps: int) -> None:
        m = fastcl.cosine_schedule(min(step, total_steps), total_steps,
                                   self.hparams["teacher_momentum"], 1.0)
        momentum_follow(self.teacher, self.backbone, *self.heads, momentum=m)

