"""InstDisc and CMC (memory-bank methods) and the RGB -> Lab conversion: losses against their
formulas, bank updates, the views, a few training steps, bad inputs, and one trainer run that passes
the batch's dataset indices (Method.batch_extras) and logs the bank kNN monitor."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl import formulas
from fastcl.color import normalized_lab, rgb_to_lab
from fastcl.data import ImageData
from fastcl.methods.cmc import with_in_channels
from fastcl.models import build_backbone
from fastcl.train import TrainConfig, train
from tests.helpers import assert_decreasing, make_method, train_on_batch, uint8_images

NUM_ITEMS = 64


def _method(name, channels=1, num_items=NUM_ITEMS, **hparams):
    hparams.setdefault("num_negatives", 16)
    return make_method(name, channels, num_items=num_items, **hparams)


def _batch(n=16, channels=1, seed=0):
    images, g = uint8_images(n, channels, seed=seed)
    indices = torch.randperm(NUM_ITEMS, generator=g)[:n]
    return images, indices, g


def _fit(method, channels=1, steps=8):
    images, indices, g = _batch(channels=channels)
    views = method.augment(images, g)
    return train_on_batch(method, views, steps, epoch=0, lr=3e-3, indices=indices)



# ---------------------------------------------------------------------------------------------
# RGB -> Lab
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rgb, lab", [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((0.5, 0.5, 0.5), (53.3889, 0.0, 0.0)),
])
def test_rgb_to_lab_reference_colors(rgb, lab):
    x = torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 2, 3)
    out = rgb_to_lab(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out[..., 0, 0][0], torch.tensor(lab, dtype=torch.float64),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(rgb_to_lab(x.float()).double(), out, atol=1e-3, rtol=1e-5)


def test_lab_normalization_and_errors():
    g = torch.Generator().manual_seed(0)
    lab = normalized_lab(torch.rand(64, 3, 4, 4, generator=g))
    assert lab.abs().max() <= 1.0 + 1e-4
    with pytest.raises(ValueError, match="rgb"):
        rgb_to_lab(torch.rand(2, 1, 4, 4))
    with pytest.raises(TypeError, match="rgb"):
        rgb_to_lab(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="rgb"):
        rgb_to_lab([[0.5]])


# ---------------------------------------------------------------------------------------------
# InstDisc
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_instdisc_loss_is_the_formula(loss):
    method = _method("instdisc", loss=loss, temperature=0.5)
    images, indices, g = _batch()
    image_view, negatives = method.augment(images, g)
    assert negatives.shape == (16, 16) and negatives.dtype == torch.int64
    assert 0 <= int(negatives.min()) and int(negatives.max()) < NUM_ITEMS
    got = method([image_view, negatives], indices=indices)
    f = method.embed(image_view).double()
    bank = method.memory.tensor.double()
    rows = torch.cat([indices[:, None], negatives], 1)
    if loss == "softmax":
        want = formulas.sampled_info_nce(f, bank, rows, 0.5)
    else:
        # Z = mean(exp(v . f / tau)) * n on the first batch, then frozen.
        z = torch.exp(torch.einsum("bkd,bd->bk", bank[rows], f) / 0.5).mean() * NUM_ITEMS
        torch.testing.assert_close(method.nce.z.double(), z, rtol=1e-5, atol=0)
        want = formulas.sampled_nce(f, bank, rows, z, 0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_instdisc_bank_update_after_step_and_same_draws():
    method = _method("instdisc")
    images, indices, g = _batch()
    views = method.augment(images, g)
    again = method.augment(images, torch.Generator().manual_seed(0))
    assert not torch.equal(views[1], again[1])  # g advanced: a new draw
    before = method.memory.tensor.clone()
    method(views, indices=indices)
    torch.testing.assert_close(method.memory.tensor, before)  # scored against the old bank
    f = method.embed(views[0]).detach()
    method.after_step(0, 1)
    want = F.normalize(0.5 * before[indices] + 0.5 * f, dim=1)
    torch.testing.assert_close(method.memory.tensor[indices], want, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(NUM_ITEMS, dtype=torch.bool)
    untouched[indices] = False
    torch.testing.assert_close(method.memory.tensor[untouched], before[untouched])


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_instdisc_trains(loss):
    assert_decreasing(_fit(_method("instdisc", loss=loss)))


def test_instdisc_errors():
    with pytest.raises(ValueError, match="num_items"):
        _method("instdisc", num_items=0)
    with pytest.raises(ValueError, match="loss"):
        _method("instdisc", loss="nce2")
    with pytest.raises(ValueError, match="num_negatives"):
        _method("instdisc", num_negatives=0)
    method = _method("instdisc")
    images, indices, g = _batch()
    views = method.augment(images, g)
    with pytest.raises(ValueError, match="indices"):
        method(views)
    with pytest.raises(ValueError, match="indices"):
        method(views, indices=indices[:3])
    with pytest.raises(ValueError, match="indices"):
        method(views, indices=indices + NUM_ITEMS)  # rows beyond the bank


# ---------------------------------------------------------------------------------------------
# CMC
# ---------------------------------------------------------------------------------------------
def test_cmc_color_views_are_l_and_ab():
    method = _method("cmc", channels=3)
    assert method.backbone.first.stem[0].in_channels == 1
    assert method.backbone.second.stem[0].in_channels == 2
    images, _, g = _batch(channels=3)
    crop, negatives = method.augment(images, g)  # color: one crop, split into L and ab
    assert crop.shape == (16, 3, 8, 8) and negatives.shape == (16, 16)
    l_view, ab_view = method.backbone.split(crop)
    rgb = crop * 0.4 + 0.3
    torch.testing.assert_close(torch.cat([l_view, ab_view], 1), normalized_lab(rgb))
    assert method.backbone(crop).shape == (16, 2 * method.backbone.first.out_dim)


def test_cmc_gray_views_are_two_crops():
    method = _method("cmc")
    images, _, g = _batch()
    first, second, negatives = method.augment(images, g)
    assert first.shape == second.shape == (16, 1, 8, 8) and not torch.equal(first, second)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(method.backbone(x), torch.cat(
        [method.backbone.first(x), method.backbone.second(x)], 1))


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_cmc_loss_is_the_formula(loss):
    method = _method("cmc", channels=3, loss=loss, temperature=0.5)
    images, indices, g = _batch(channels=3)
    crop, negatives = method.augment(images, g)
    got = method([crop, negatives], indices=indices)
    l_view, ab_view = method.backbone.split(crop)
    f_l = F.normalize(method.heads[0](method.backbone.first(l_view)), dim=1).double()
    f_ab = F.normalize(method.heads[1](method.backbone.second(ab_view)), dim=1).double()
    bank_l, bank_ab = (m.tensor.double() for m in method.memories)
    rows = torch.cat([indices[:, None], negatives], 1)
    if loss == "softmax":
        want = (formulas.sampled_info_nce(f_l, bank_ab, rows, 0.5)
                + formulas.sampled_info_nce(f_ab, bank_l, rows, 0.5))
    else:  # one Z per view
        z_l, z_ab = (nce.z.double() for nce in method.nce)
        assert not torch.allclose(z_l, z_ab)
        want = (formulas.sampled_nce(f_l, bank_ab, rows, z_l, 0.5)
                + formulas.sampled_nce(f_ab, bank_l, rows, z_ab, 0.5))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    method.after_step(0, 1)
    torch.testing.assert_close(method.memories[0].tensor[indices], F.normalize(
        0.5 * bank_l[indices] + 0.5 * f_l, dim=1).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels, loss", [(1, "nce"), (3, "softmax")])
def test_cmc_trains(channels, loss):
    assert_decreasing(_fit(_method("cmc", channels=channels, loss=loss), channels=channels))


def test_with_in_channels_copies_and_swaps_the_first_convolution():
    vit = build_backbone("vit_small", in_channels=3, image_size=8, width=0.25)
    two = with_in_channels(vit, 2)
    assert two.embed.in_channels == 2 and vit.embed.in_channels == 3
    assert two(torch.randn(2, 2, 8, 8)).shape == (2, vit.out_dim)


def test_cmc_errors():
    with pytest.raises(ValueError, match="num_items"):
        _method("cmc", num_items=0)
    with pytest.raises(ValueError, match="loss"):
        _method("cmc", loss="infonce")
    method = _method("cmc")
    images, _, g = _batch()
    with pytest.raises(ValueError, match="indices"):
        method(method.augment(images, g))


# ---------------------------------------------------------------------------------------------
# Trainer: indices passed, bank monitor logged
# ---------------------------------------------------------------------------------------------
def test_trainer_passes_indices_and_logs_the_bank_knn(tmp_path):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 255, (48, 1, 8, 8)).astype(np.uint8))
    y = torch.from_numpy(rng.integers(0, 3, 48).astype(np.int64))
    data = ImageData("tiny", x[:32], y[:32], x[32:], y[32:], ["a", "b", "c"])
    result = train(TrainConfig(method="instdisc", width=0.125, batch_size=16, epochs=2,
                               out=str(tmp_path), progress=False,
                               hparams=dict(num_negatives=8)), data=data)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["epoch", "loss", "lr", "images_per_s", "knn_top1", "bank_knn_top1",
                      "seconds"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    bank = state["model"]["memory.memory"]
    # Every training image was a batch member once per epoch: every row moved off its start.
    fresh = _method("instdisc", num_items=32, num_negatives=8)
    assert bank.shape == (32, 128)
    assert not torch.isclose(bank, fresh.memory.tensor).all(1).any()
