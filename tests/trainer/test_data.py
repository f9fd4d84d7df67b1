"""Data loaders on each format, epoch batching, and the batched device augmentations."""
import pickle
import time

import numpy as np
import pytest
import torch

from fastcl import augment
from fastcl.data import digits, epoch_batches, load_data


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------
def test_digits_default():
    data = load_data(None)
    assert data.name == "digits"
    assert data.x_train.dtype == torch.uint8 and data.x_train.shape[1:] == (1, 8, 8)
    assert len(data.x_train) + len(data.x_test) == 1797
    assert int(data.x_train.max()) == 255
    # Stratified: every class in both splits, about 20% of each in the test split.
    for c in range(10):
        n_test, n_train = int((data.y_test == c).sum()), int((data.y_train == c).sum())
        assert abs(n_test / (n_test + n_train) - 0.2) < 0.02
    again = digits()
    assert torch.equal(again.x_test, data.x_test)  # the split is fixed


def test_digits_shift_defeats_raw_pixels():
    """The harder set: same labels and split as the digits, but raw-pixel kNN weak (0.95 on the
    digits)."""
    from fastcl.evaluate import knn_accuracy

    data, base = load_data("digits-shift"), digits()
    assert data.x_train.shape == (len(base.x_train), 3, 16, 16)
    assert torch.equal(data.y_test, base.y_test) and not data.mirror_invariant
    raw = knn_accuracy(data.x_train.flatten(1).float(), data.y_train,
                       data.x_test.flatten(1).float(), data.y_test)
    assert raw < 0.3
    assert torch.equal(load_data("digits-shift").x_test, data.x_test)  # fixed by the seed


def test_digits_color_is_the_digits_in_two_colours():
    """Every pixel of digits-color is the blend of the two palette colours that its digits ink
    gives, so a pixel's ink can be read back from any channel."""
    from fastcl.data import BACKGROUND_RGB, DIGIT_RGB

    data, base = load_data("digits-color"), digits()
    assert data.x_train.shape == (len(base.x_train), 3, 8, 8) and not data.mirror_invariant
    assert torch.equal(data.y_train, base.y_train) and torch.equal(data.y_test, base.y_test)
    ink = base.x_test.float() / 255  # (N, 1, 8, 8)
    for c in range(3):
        expected = (BACKGROUND_RGB[c] + (DIGIT_RGB[c] - BACKGROUND_RGB[c]) * ink[:, 0]) * 255
        assert (data.x_test[:, c].float() - expected).abs().max() <= 0.5


def _write_cifar10(folder, n=6):
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_cifar10_batches(tmp_path):
    _write_cifar10(tmp_path)
    data = load_data(tmp_path)
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert data.classes[3] == "c3"
    with open(tmp_path / "data_batch_1", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(data.x_train[0].flatten(), torch.from_numpy(raw[b"data"][0]))


def test_cifar100_files(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [("train", 5), ("test", 3)]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(rng.integers(0, 100, n))}, f)
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"k{i}".encode() for i in range(100)]}, f)
    data = load_data(tmp_path)
    assert data.x_train.shape == (5, 3, 32, 32) and len(data.classes) == 100


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 6, 6, 3), dtype=np.uint8)
    arrays = {"nhw": x[..., 0], "nhwc": x, "nchw": x.transpose(0, 3, 1, 2),
              "float": x.astype(np.float32) / 255}[layout]
    path = tmp_path / "d.npz"
    np.savez(path, x_train=arrays, y_train=np.arange(7) % 2, x_test=arrays[:3],
             y_test=np.arange(3) % 2)
    data = load_data(path)
    channels = 1 if layout == "nhw" else 3
    assert data.x_train.shape == (7, channels, 6, 6) and data.x_train.dtype == torch.uint8
    expected = x[..., :channels].transpose(0, 3, 1, 2)
    assert np.array_equal(data.x_train.numpy(), expected)


def _image_folder(root, sizes=None, classes=("a", "b"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                side = (sizes or {}).get((split, c, i), 8)
                arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_image_folder(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "train" / "b" / "notes.txt").write_text("ignored: not an image")
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        data = load_data(tmp_path)
    assert data.x_train.shape == (6, 3, 8, 8) and data.x_test.shape == (6, 3, 8, 8)
    assert data.classes == ["a", "b"] and data.y_train.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("gray", [("train", "a", 0), ("val", "b", 2)])
def test_image_folder_gray_and_colour_loads_rgb(tmp_path, gray):
    """One gray image (the very first, or one of val/) among colour ones: all load as RGB, the
    gray one with R = G = B."""
    from PIL import Image

    _image_folder(tmp_path)
    split, c, i = gray
    path = tmp_path / split / c / f"{i}.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").save(path)
    data = load_data(tmp_path)
    assert data.x_train.shape == (6, 3, 8, 8) and data.x_test.shape == (6, 3, 8, 8)
    x = (data.x_train if split == "train" else data.x_test)[(c == "b") * 3 + i]
    assert all(torch.equal(x[ch], torch.arange(64, dtype=torch.uint8).view(8, 8))
               for ch in range(3))


def test_image_folder_all_gray_is_one_channel(tmp_path):
    from PIL import Image

    _image_folder(tmp_path)
    for path in tmp_path.glob("*/*/*.png"):
        Image.open(path).convert("L").save(path)
    assert load_data(tmp_path).x_train.shape == (6, 1, 8, 8)


def _mixed_folder(root):
    """An ImageFolder of every size and mode: square and not, gray, palette, RGBA, PNG, JPEG,
    WebP, one file that is not an image at all and one PNG cut in half (its header reads, its
    pixels do not)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = [(8, 8), (9, 12), (31, 20), (7, 5), (40, 64)]
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i, (h, w) in enumerate(shapes):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    Image.fromarray(np.arange(96, dtype=np.uint8).reshape(8, 12), "L").save(
        root / "train" / "a" / "gray.webp", lossless=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(
        root / "train" / "a" / "palette.png")
    Image.fromarray(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), "RGBA").save(
        root / "train" / "b" / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(
        root / "train" / "b" / "photo.jpg", quality=90)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    whole = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "b" / "truncated.png").write_bytes(whole[:len(whole) // 2])
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_streams_any_size_and_mode(tmp_path, workers):
    """Streamed (cache never): every image cut to --image-size whatever its size and mode, gray
    ones as R = G = B; the unreadable file is skipped when the folder is read, the truncated one
    when it is decoded (replaced by the next file, flagged); a batch's random crops depend on the
    seed and index, not on the number of workers."""
    from fastcl.data import ImageFiles, decode_image

    _mixed_folder(tmp_path)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        data = load_data(tmp_path, image_size=12, workers=workers, cache="never")
    assert data.streamed and data.channels == 3 and data.image_size == 12
    files = data.x_train
    assert isinstance(files, ImageFiles) and len(files) == 15 and files.workers == workers
    batches = [list(range(0, 8)), list(range(8, 15))]
    seen = [(x.clone(), i.clone(), ok.clone())
            for x, i, ok in files.loader(batches, seed=(3, 1))]
    images = torch.cat([x for x, _, _ in seen])
    indices = torch.cat([i for _, i, _ in seen])
    readable = torch.cat([ok for _, _, ok in seen])
    assert images.shape == (15, 3, 12, 12) and images.dtype == torch.uint8
    truncated = files.paths.index(str(tmp_path / "train" / "b" / "truncated.png"))
    assert readable.tolist() == [i != truncated for i in range(15)]
    after = (truncated + 1) % 15  # the next file, from the start after the last
    assert indices[truncated] == after and torch.equal(images[truncated], images[after])
    gray = files.paths.index(str(tmp_path / "train" / "a" / "gray.webp"))
    assert torch.equal(images[gray, 0], images[gray, 1]) and torch.equal(images[gray, 0],
                                                                         images[gray, 2])
    # The same draws in another worker layout (one batch, workers 0), other draws another epoch.
    again = ImageFiles(files.paths, "RGB", 12, 0)
    (x0, _, _), = again.loader([list(range(15))], seed=(3, 1))
    assert torch.equal(x0, images)
    (x1, _, _), = again.loader([list(range(15))], seed=(3, 2))
    assert not torch.equal(x1, images)
    # Evaluation: the centred square of each image, resized.
    (centred, _, _), = again.loader([[gray]])
    expected = decode_image(files.paths[gray], "RGB", 12)
    assert torch.equal(centred[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_image_folder_cached_is_the_streamed_evaluation_view(tmp_path):
    """--cache auto holds a small folder in memory: the centred squares that streaming evaluates,
    the truncated file dropped with its label."""
    _mixed_folder(tmp_path)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        cached = load_data(tmp_path, image_size=10)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        streamed = load_data(tmp_path, image_size=10, cache="never")
    assert not cached.streamed and cached.x_train.shape == (14, 3, 10, 10)
    images, kept = streamed.x_train.read(range(len(streamed.x_train)))
    assert torch.equal(cached.x_train, images) and len(kept) == 14
    assert torch.equal(cached.y_train, streamed.y_train[kept])
    assert torch.equal(cached.x_test, streamed.x_test.read(range(10))[0])
    # The default side: the median shorter side of the training images.
    with pytest.warns(RuntimeWarning):
        assert load_data(tmp_path).image_size == 9


def test_crop_box_follows_torchvision_sampling():
    """torchvision's RandomResizedCrop.get_params: crops inside the image with area and aspect in
    range (up to rounding); when 10 tries cannot fit, the centred crop with the ratio clamped."""
    from fastcl.data import crop_box

    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = crop_box(50, 30, (0.25, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 50 and 0 <= top and top + h <= 30
        assert 0.25 * 1500 * 0.9 <= w * h <= 1500 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # Area 1 of a 2:1 image with a ratio of at most 4/3 never fits: the centred 4:3 crop.
    assert crop_box(20, 10, (1.0, 1.0), (3 / 4, 4 / 3), rng) == (3, 0, 13, 10)
    assert crop_box(10, 20, (1.0, 1.0), (3 / 4, 4 / 3), rng) == (0, 3, 10, 13)
    assert crop_box(12, 12, (1.0, 1.0), (1.0, 1.0), rng) == (0, 0, 12, 12)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("layout", "unknown layout"),
    ("no_classes", "no class sub-folders"),
    ("txt", "must be an .npz"),
    ("npz_keys", "lacks"),
    ("npz_shape", "must hold images"),
])
def test_bad_data(tmp_path, case, match):
    path = tmp_path / "d"
    if case == "empty":
        path.mkdir()
    elif case == "layout":
        path.mkdir()
        (path / "something").mkdir()
    elif case == "no_classes":
        (path / "train").mkdir(parents=True)
        (path / "val").mkdir()
    elif case == "txt":
        path = tmp_path / "d.txt"
        path.write_text("x")
    elif case == "npz_keys":
        path = tmp_path / "d.npz"
        np.savez(path, x_train=np.zeros((2, 4, 4)))
    elif case == "npz_shape":
        path = tmp_path / "d.npz"
        z = np.zeros((2, 4))
        np.savez(path, x_train=z, y_train=z[:, 0], x_test=z, y_test=z[:, 0])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_data(path)


def test_epoch_batches_cover_and_split_ranks():
    one = torch.cat(list(epoch_batches(100, 10, seed=1, epoch=0)))
    assert sorted(one.tolist()) == list(range(100))
    again = torch.cat(list(epoch_batches(100, 10, seed=1, epoch=0)))
    assert torch.equal(one, again)
    assert not torch.equal(one, torch.cat(list(epoch_batches(100, 10, seed=1, epoch=1))))
    # Two ranks of 8: disjoint halves of each global batch of 16, the last partial one dropped.
    ranks = [list(epoch_batches(100, 8, seed=1, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    both = torch.cat([torch.cat([a, b]) for a, b in zip(*ranks)])
    assert len(set(both.tolist())) == 96


# ----------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------
def _images(b=6, c=3, side=8):
    return torch.rand(b, c, side, side, generator=torch.Generator().manual_seed(1))


def test_crop_full_scale_no_flip_is_identity():
    x = _images()
    g = torch.Generator().manual_seed(0)
    out = augment.random_resized_crop(x, 8, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    flipped = augment.random_resized_crop(x, 8, g, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                          flip_p=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


def test_transforms_with_p_zero_are_identity():
    x, g = _images(), torch.Generator().manual_seed(0)
    assert torch.equal(augment.color_jitter(x, g, p=0.0), x)
    assert torch.equal(augment.random_grayscale(x, g, p=0.0), x)
    assert torch.equal(augment.random_solarize(x, g, p=0.0), x)
    assert torch.equal(augment.gaussian_blur(x, g, p=0.0), x)


def test_per_sample_parameters():
    """One call draws different parameters for the samples of a batch."""
    x = _images(1).expand(16, -1, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    out = augment.color_jitter(x, g, p=1.0)
    assert len({round(v, 4) for v in out.mean(dim=(1, 2, 3)).tolist()}) == 16
    crops = augment.random_resized_crop(x, 8, g, scale=(0.2, 1.0))
    assert len({round(v, 4) for v in crops.mean(dim=(1, 2, 3)).tolist()}) > 8


def test_grayscale_solarize_blur_values():
    x, g = _images(), torch.Generator().manual_seed(0)
    gray = augment.random_grayscale(x, g, p=1.0)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(gray, luma[:, None].expand_as(x))
    sol = augment.random_solarize(x, g, p=1.0)
    torch.testing.assert_close(sol, torch.where(x >= 0.5, 1 - x, x))
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(augment.gaussian_blur(flat, g, p=1.0), flat)  # keeps the mean
    blurred = augment.gaussian_blur(_images(side=32), g, p=1.0, sigma=(40.0, 40.0))
    assert blurred.std() < _images(side=32).std()


def test_hue_rotation_keeps_gray():
    gray = torch.full((3, 3, 4, 4), 0.4)
    out = augment.color_jitter(gray, torch.Generator().manual_seed(0), brightness=0,
                               contrast=0, saturation=0, hue=0.5, p=1.0)
    torch.testing.assert_close(out, gray, atol=1e-5, rtol=0)


def test_recipe_deterministic_and_normalized():
    x = (torch.rand(32, 3, 16, 16) * 255).to(torch.uint8)
    recipe = augment.Recipe(12, solarize_p=0.2).with_stats([0.5] * 3, [0.25] * 3)
    a = recipe(x, torch.Generator().manual_seed(3))
    b = recipe(x, torch.Generator().manual_seed(3))
    assert a.shape == (32, 3, 12, 12) and torch.equal(a, b)
    assert a.min() >= -2 - 1e-5 and a.max() <= 2 + 1e-5  # [0, 1] mapped by (x - 0.5) / 0.25


def test_augmentation_is_not_the_bottleneck():
    """Two SimCLR views of a 64-image 32x32 batch take a fraction of a ResNet-18 step."""
    from fastcl.models import build_backbone

    x = (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8)
    recipe = augment.Recipe(32, jitter=(0.8, 0.8, 0.8, 0.2))
    g = torch.Generator().manual_seed(0)
    recipe(x, g)
    t0 = time.perf_counter()
    views = [recipe(x, g) for _ in range(2)]
    t_aug = time.perf_counter() - t0
    net = build_backbone("resnet18", width=0.25)
    t0 = time.perf_counter()
    net(torch.cat(views)).sum().backward()
    t_step = time.perf_counter() - t0
    assert t_aug < 0.5 * t_step, (t_aug, t_step)


def test_digits_shift_crops_keep_the_digit():
    """The trainer raises the methods' crops to the data's min_crop_side: 10 of the 16 px here,
    since a digit spans down to 7 px (6 px crops of the digits' 8 px elsewhere)."""
    assert load_data("digits-shift").min_crop_side == 10 and digits().min_crop_side == 6
