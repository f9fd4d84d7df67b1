"""Every method trains a few steps on a tiny CPU batch with a finite, decreasing loss; backbones
and heads have the shapes they promise."""
import math

import pytest
import torch

from fastcl.methods import METHODS, get_method
from fastcl.models import build_backbone, mlp
from tests.helpers import make_method, train_on_batch, uint8_images


def _fit(method, steps=6, epoch=0):
    """Adam on one fixed batch of augmented views: the loss must go down."""
    images, g = uint8_images()
    views = method.augment(images, g)
    return train_on_batch(method, views, steps, epoch=epoch, lr=1e-2)


@pytest.mark.parametrize("name", ["simclr", "swav", "mocov2", "byol"])
def test_method_trains(name):
    torch.manual_seed(0)
    method = make_method(name)
    losses = _fit(method, epoch=5)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_swav_views_and_frozen_prototypes():
    method = make_method("swav", num_small_crops=3)
    assert [r.size for r in method.recipes] == [8, 8]  # small crops of 8 px: under 6 px, none
    backbone = build_backbone("resnet18", in_channels=1, image_size=32, width=0.125)
    large = get_method("swav")(backbone, image_size=32, mean=[0.3], std=[0.4], num_small_crops=3)
    assert [r.size for r in large.recipes] == [32, 32, 14, 14, 14]
    g = torch.Generator().manual_seed(0)
    views = large.augment((torch.rand(8, 1, 32, 32, generator=g) * 255).to(torch.uint8), g)
    loss = large(views, epoch=1)
    loss.backward()
    assert torch.isfinite(loss) and large.prototypes.weight.grad is not None
    before = method.prototypes.weight.detach().clone()
    _fit(method, steps=2, epoch=0)  # epoch 0: prototypes frozen (only re-normalized)
    torch.testing.assert_close(method.prototypes.weight, torch.nn.functional.normalize(before))
    _fit(method, steps=2, epoch=1)
    assert not torch.allclose(method.prototypes.weight, before)


def test_swav_queue_fills_and_is_used():
    method = make_method("swav", queue_length=32, queue_start_epoch=0, num_small_crops=0)
    _fit(method, steps=1)
    assert bool(method.queue[:, :16].any()) and not bool(method.queue[:, 16:].any())
    losses = _fit(method, steps=3)  # full from the second step on: its scores join Sinkhorn
    assert bool(method.queue[:, -1].any())
    assert all(torch.isfinite(torch.tensor(losses)))


def test_byol_target_follows_with_cosine_momentum():
    method = make_method("byol", momentum_base=0.9)
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    target_before = [p.detach().clone() for p in method.target.parameters()]
    method.after_step(1, 6)
    # After step 1 of 6 (from 0): tau = 1 - (1 - 0.9) * (cos(pi / 6) + 1) / 2.
    tau = 1 - 0.1 * (math.cos(math.pi / 6) + 1) / 2
    for t, before, o in zip(method.target.parameters(), target_before, online):
        torch.testing.assert_close(t, tau * before + (1 - tau) * o.detach())
    assert not any(p.requires_grad for p in method.target.parameters())


def test_mocov2_head_queue_and_key_encoder():
    method = make_method("mocov2", queue_size=24)
    assert [type(m).__name__ for m in method.head] == ["Linear", "ReLU", "Linear"]
    assert method.key_encoder[1] is not method.head
    _fit(method, steps=2)
    # Two batches of 16 keys went through a queue of 24 rows, wrapping around.
    assert method.queue.tensor.shape == (24, 128)
    keys_norm = method.queue.tensor.norm(dim=1)
    torch.testing.assert_close(keys_norm, torch.ones(24))


def test_unknown_method_and_hparam():
    with pytest.raises(ValueError, match="simclr"):
        get_method("nope")
    with pytest.raises(ValueError, match="temperature"):
        make_method("simclr", tempreature=0.1)


@pytest.mark.parametrize("name, in_ch, side, dim", [
    ("resnet18", 3, 16, 64), ("resnet50", 1, 8, 256), ("vit_small", 3, 16, 48)])
def test_backbones(name, in_ch, side, dim):
    net = build_backbone(name, in_channels=in_ch, image_size=side, width=0.125 if
                         name.startswith("resnet") else 0.25)
    out = net(torch.randn(2, in_ch, side, side))
    assert out.shape == (2, net.out_dim) and net.out_dim == dim
    if name == "vit_small":  # other sides (multi-crop) interpolate the position grid
        assert net(torch.randn(2, in_ch, side // 2, side // 2)).shape == (2, dim)


def test_resnet_imagenet_stem():
    """The ImageNet stem (7x7 stride-2 convolution, 3x3 stride-2 max-pool) brings the image to a
    quarter of its side before the first stage; the default stem keeps it."""
    from fastcl.models import Bottleneck, ResNet

    sides = {}
    for stem in ("small", "imagenet"):
        net = ResNet(Bottleneck, (1, 1, 1, 1), width=0.125, stem=stem)
        sides[stem] = net.stem(torch.randn(2, 3, 32, 32)).shape[-1]
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, net.out_dim) == (2, 256)
    assert sides == {"small": 32, "imagenet": 8}
    with pytest.raises(ValueError, match="stem"):
        ResNet(Bottleneck, (1, 1, 1, 1), stem="cifar")


def test_vit_default_patches():
    """An 8x8 grid of patches where the side allows, else 2 px patches (1 px ones hold a colour
    each: a random-init ViT was then a bag of colours, kNN 0.25 on the 8 px digits)."""
    from fastcl.models import ViT

    sides = (64, 32, 16, 8, 6, 1)
    assert [ViT(side, dim=24, depth=1).patch for side in sides] == [8, 4, 2, 2, 2, 1]
    assert build_backbone("vit_small", image_size=8, width=0.25).grid(8) == 4


def test_vit_tokens_and_masks():
    """Class and patch tokens; a masked patch is the mask token before the position embedding, so
    its input no longer matters; 4 px patches of 32 px images, other sides interpolated."""
    from fastcl.models import ViT

    torch.manual_seed(0)
    net = ViT(32, in_channels=1, dim=24, depth=2, patch_size=4)
    x = torch.randn(3, 1, 32, 32)
    cls, patches = net.tokens(x)
    assert cls.shape == (3, 24) and patches.shape == (3, 64, 24) and net.grid(32) == 8
    torch.testing.assert_close(net(x), cls)
    masks = torch.zeros(3, 64, dtype=torch.bool)
    masks[1, :10] = True
    with torch.no_grad():
        net.mask_token.normal_()
    masked_cls, masked = net.tokens(x, masks)
    y = x.clone()
    y[1, :, :4, :] = torch.randn(1, 4, 32)  # the pixels of patches 0-7 (the first row)
    torch.testing.assert_close(net.tokens(y, masks)[1], masked)
    torch.testing.assert_close(masked[0], patches[0])  # image 0 has no mask
    assert not torch.allclose(masked[1], patches[1])
    assert net.tokens(torch.randn(2, 1, 12, 12))[1].shape == (2, 9, 24)
    with pytest.raises(ValueError, match="patch_size"):
        ViT(8, patch_size=9)


def test_backbone_errors():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("resnet19")
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=0)


def test_mlp_layers():
    head = mlp([8, 16, 4], last_batch_norm=True, last_affine=False)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[0].bias is None and head[3].bias is None and head[4].weight is None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_full_size_crops_keep_the_data_min_crop_side(name):
    """Every full-size crop spans at least ImageData.min_crop_side pixels: the data set's, as
    the trainer passes it (digits-shift: 10 of 16 px), else 6."""
    from fastcl.data import ImageData
    from fastcl.train import TrainConfig, build_method

    cfg = TrainConfig(method=name).resolved()
    for side in (6, 10):
        method = build_method(cfg, 3, 16, [0.5] * 3, [0.2] * 3, num_items=32,
                              min_crop_side=side)
        full = [r for r in method.recipes if r.size == 16]
        assert full and all(r.scale[0] >= (side / 16) ** 2 - 1e-9 for r in full)
    assert ImageData.min_crop_side == 6


@pytest.mark.parametrize("name,image,side,small_scales", [
    ("swav", 32, 6, [(0.05, 0.14)] * 2),
    ("swav", 16, 10, []),             # digits-shift: the largest small crop is 6 px of 16
    ("swav", 8, 6, []),               # the digits
    ("dino", 32, 6, [(0.05, 0.4)] * 4),
    ("dino", 16, 10, [((10 / 16) ** 2, 0.4)] * 4),
    ("dino", 8, 6, []),
])
def test_small_crops_keep_the_data_min_crop_side(name, image, side, small_scales):
    """Multi-crop's small crops obey ImageData.min_crop_side like the others; where even the
    largest of them would be under it, the method takes none."""
    from fastcl.train import TrainConfig, build_method

    method = build_method(TrainConfig(method=name).resolved(), 3, image, [0.5] * 3, [0.2] * 3,
                          num_items=32, min_crop_side=side)
    small = [r.scale for r in method.recipes if r.size != image]
    assert len(small) == len(small_scales)
    for scale, expected in zip(small, small_scales):
        assert scale == pytest.approx(expected)
