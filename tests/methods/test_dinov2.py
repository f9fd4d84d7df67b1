"""DINOv2: its loss against the formulas in float64, training steps, block masks against DINOv2's
MaskingGenerator and collate logic (retyped below), bad input (exact resume through the trainer:
tests/trainer/test_train.py)."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl import formulas
from fastcl.methods.dinov2 import MaskingGenerator, batch_masks
from tests.helpers import assert_decreasing, make_method, train_on_batch, uint8_images


class DINOv2MaskingGenerator:
    """DINOv2's MaskingGenerator, retyped from facebookresearch/dinov2 dinov2/data/masking.py, with
    the module-level `random` replaced by an explicit random.Random and numpy by the same calls."""

    def __init__(self, input_size, num_masking_patches=None, min_num_patches=4,
                 max_num_patches=None, min_aspect=0.3, max_aspect=None):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches, rng):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches, rng):
        mask = np.zeros(shape=(self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break
            else:
                mask_count += delta
        return mask


def dinov2_collate_masks(B, N, mask_ratio_tuple, mask_probability, mask_generator, rng):
    """The masks of DINOv2's collate_data_and_cast (dinov2/data/collate.py), retyped."""
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    masks_list = []
    for i in range(0, n_samples_masked):
        prob_min = probs[i]
        prob_max = probs[i + 1]
        masks_list.append(torch.BoolTensor(mask_generator(int(N * rng.uniform(prob_min, prob_max)),
                                                          rng)))
    for i in range(n_samples_masked, B):
        masks_list.append(torch.BoolTensor(mask_generator(0, rng)))
    rng.shuffle(masks_list)
    return torch.stack(masks_list).flatten(1)


# --- masks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,images", [(8, 32), (4, 6), (14, 20)])
def test_masks_are_dinov2s(grid, images):
    """The same random stream gives DINOv2's masks exactly."""
    ours = MaskingGenerator(grid, grid, max_num_patches=0.5 * grid * grid)
    theirs = DINOv2MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    for seed in range(5):
        a = batch_masks(ours, images, (0.1, 0.5), 0.5, random.Random(seed))
        b = dinov2_collate_masks(images, grid * grid, (0.1, 0.5), 0.5, theirs, random.Random(seed))
        assert torch.equal(a, b)


def test_mask_counts_and_blocks():
    gen = MaskingGenerator(8, 8, max_num_patches=32)
    rng = random.Random(0)
    for n in (0, 3, 5, 20, 32):
        for _ in range(20):
            mask = gen(n, rng)
            assert mask.shape == (8, 8) and int(mask.sum()) <= n
            assert (n >= 4) <= bool(mask.any())
    for _ in range(20):  # one block is a rectangle of at least 4 patches
        mask = torch.zeros(8, 8, dtype=torch.bool)
        added = gen._add_block(mask, 32, rng)
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert added == int(mask.sum()) >= 3 and bool(box.all())
    masks = batch_masks(gen, 20, (0.1, 0.5), 0.5, random.Random(1))
    counts = masks.sum(1)
    assert masks.shape == (20, 64) and int((counts > 0).sum()) <= 10
    # The i-th masked image draws from the i-th slice of linspace(0.1, 0.5, 11): at most 0.5 N.
    assert int(counts.max()) <= 32 and int((counts == 0).sum()) >= 10


# --- the loss ----------------------------------------------------------------------------------
def _ibot_formula(student, teacher, masks, student_temp, teacher_temp):
    """DINOv2's iBOTPatchLoss.forward_masked (dinov2/loss/ibot_patch_loss.py) on Sinkhorn targets
    (sinkhorn_knopp_teacher: SwAV's algorithm, formulas.sinkhorn, over the masked patches)."""
    t = formulas.sinkhorn(teacher, teacher_temp, 3)
    loss = torch.sum(t * F.log_softmax(student / student_temp, dim=-1), dim=-1)
    masks_weight = ((1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1)
                    .expand_as(masks)[masks])
    return -(loss * masks_weight).sum() / masks.shape[0]


@pytest.mark.parametrize("separate", [0, 1])
def test_loss_matches_formulas(separate):
    method = make_method("dinov2", backbone="vit_small", image_size=16, out_dim=32,
                         num_local_crops=2, ibot_separate_head=separate).double()
    assert [r.size for r in method.recipes] == [16, 16, 7, 7]
    images, g = uint8_images(side=16)
    views = method.augment(images, g)
    views = [v.double() if v.is_floating_point() else v for v in views]
    *crops, masks = views
    assert masks.shape == (32, 64) and masks.any()
    with torch.no_grad():  # the heads' last layers are learnt: move them off the identical init
        for head in method.heads:
            head.last_norm.mul_(1.5)
    loss = method(views, epoch=1)
    b, st, tt = 16, 0.2, method.teacher_temperature(1)
    assert tt == pytest.approx(0.04 + 0.03 / 3)
    with torch.no_grad():
        cls_g, patches = method.backbone.tokens(torch.cat(crops[:2]), masks)
        cls_l = method.backbone(torch.cat(crops[2:]))
        t_cls, t_patches = method.teacher[0].tokens(torch.cat(crops[:2]))
        student = method.head(torch.cat([cls_g, cls_l])).view(4, b, -1)
        teacher = method.teacher[1](t_cls).view(2, b, -1)
        dino = formulas.dino_loss_sinkhorn(student, teacher, st, tt)
        s_patch = method.heads[-1](patches[masks])
        t_patch = method.teacher[-1](t_patches[masks])
        ibot = _ibot_formula(s_patch, t_patch, masks, st, tt)
        koleo = sum(formulas.koleo(c) for c in cls_g.chunk(2))
    expected = dino + ibot + 0.1 * koleo
    assert abs(loss.item() - expected.item()) < 1e-9 * max(1.0, abs(expected.item()))


def test_trains_and_teacher_follows():
    torch.manual_seed(0)
    method = make_method("dinov2", backbone="vit_small", out_dim=32)
    images, g = uint8_images()
    views = method.augment(images, g)
    before = [p.detach().clone() for p in method.teacher.parameters()]
    losses = train_on_batch(method, views, 8, epoch=2, lr=1e-2)
    assert_decreasing(losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, method.teacher.parameters()))
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_last_layer_frozen_in_epoch_0():
    method = make_method("dinov2", backbone="vit_small", out_dim=32)
    images, g = uint8_images()
    before = method.head.last_layer.weight.detach().clone()
    train_on_batch(method, method.augment(images, g), 2, epoch=0)
    assert torch.equal(method.head.last_layer.weight, before)
    train_on_batch(method, method.augment(images, g), 2, epoch=1)
    assert not torch.equal(method.head.last_layer.weight, before)


def test_bad_input():
    with pytest.raises(ValueError, match="ViT"):
        make_method("dinov2", backbone="resnet18")
    with pytest.raises(ValueError, match="mask_ratio_min"):
        make_method("dinov2", backbone="vit_small", mask_ratio_min=0.6, mask_ratio_max=0.5)
    with pytest.raises(ValueError, match="koleo_loss_weight"):
        make_method("dinov2", backbone="vit_small", koleo_loss_weight=-1.0)
    method = make_method("dinov2", backbone="vit_small", out_dim=32)
    images, g = uint8_images()
    views = method.augment(images, g)
    with pytest.raises(ValueError, match="masks"):
        method(views[:-1])
    with pytest.raises(ValueError, match="masks"):
        method.backbone.tokens(views[0], views[-1][:3])
