"""Image data sets held in memory as uint8 tensors, and the batches the trainer draws from them.

``load_data(path)`` reads, by what ``path`` is:

- None (or "digits"): scikit-learn's bundled handwritten digits (1797 gray 8x8 images, no
  download), split into a fixed stratified 80 / 20 train / test;
- "digits-shift": the same digits rescaled, moved and recoloured on gradient backgrounds (16x16
  RGB), where raw-pixel kNN is weak: a test of learned invariances;
- "digits-color": the same digits in digits-shift's two colours and nothing else changed (8x8
  RGB): isolates what the methods' colour augmentation does to them;
- a folder with train/ and val/ (or test/) class sub-folders (ImageFolder layout);
- a folder of CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python batches;
- an .npz with x_train, y_train, x_test, y_test (images (N, H, W), (N, H, W, C) or (N, C, H, W)).

Small images fit in memory, so an epoch is a permutation of indices and a batch one gather: no
worker processes. Augmentation happens afterwards on the training device (fastcl.augment).
"""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class ImageData:
    """x_*: (N, C, H, W) uint8, y_*: (N,) int64; classes names the labels.

    mirror_invariant: whether a horizontal flip keeps an image's meaning (natural images: yes,
    handwriting: no); the augmentations flip only then. min_crop_side: the smallest random crop,
    in pixels, that still shows enough of the object; the methods raise their crop ranges to it
    (their ImageNet ranges go down to 28% of the side, which binds only on small images)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]
    mirror_invariant: bool = True
    min_crop_side: int = 6

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in [0, 1] units."""
        x = self.x_train.float() / 255
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()


def load_data(path: Optional[str | os.PathLike] = None) -> ImageData:
    """The data set at `path` (see the module docstring), or the embedded digits for None."""
    if path is None or str(path) in ("", "digits"):
        return digits()
    if str(path) == "digits-shift":
        return shifted_digits()
    if str(path) == "digits-color":
        return colored_digits()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data {str(path)!r} does not exist")
    if p.is_file():
        if p.suffix != ".npz":
            raise ValueError(f"--data file {str(p)!r} must be an .npz with x_train, y_train, "
                             f"x_test, y_test (or pass a folder)")
        return _npz(p)
    entries = {e.name for e in p.iterdir()}
    if not entries:
        raise ValueError(f"--data folder {str(p)!r} is empty")
    if "data_batch_1" in entries or {"train", "test", "meta"} <= entries and (p / "train").is_file():
        return _cifar(p)
    if "train" in entries and ("val" in entries or "test" in entries):
        return _image_folder(p)
    raise ValueError(
        f"--data folder {str(p)!r} has an unknown layout: expected train/ and val/ class "
        f"sub-folders (ImageFolder), CIFAR-10 python batches (data_batch_1..5, test_batch) or "
        f"CIFAR-100 python files (train, test, meta); found {sorted(entries)[:10]}")


def digits(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 handwritten digits (values 0..16, scaled to 0..255), stratified split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.round(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    return ImageData("digits", x[~test], y[~test], x[test], y[test], [str(c) for c in range(10)],
                     mirror_invariant=False)


# digits-shift's and digits-color's palette: an amber digit on a blue background.
BACKGROUND_RGB, DIGIT_RGB = (0.2, 0.3, 0.6), (1.0, 0.8, 0.3)


def colored_digits(seed: int = 0) -> ImageData:
    """``digits()`` drawn in amber on blue (each pixel blends the two colours by its ink), 8x8 RGB:
    the digits' shapes unchanged, but colour jitter now moves every pixel, background included."""
    base = digits(seed=seed)
    background = torch.tensor(BACKGROUND_RGB).view(1, 3, 1, 1)
    digit = torch.tensor(DIGIT_RGB).view(1, 3, 1, 1)

    def paint(x: Tensor) -> Tensor:
        ink = x.float() / 255
        return ((background * (1 - ink) + digit * ink) * 255).round().to(torch.uint8)

    return ImageData("digits-color", paint(base.x_train), base.y_train, paint(base.x_test),
                     base.y_test, base.classes, mirror_invariant=False)


def shifted_digits(side: int = 16, seed: int = 0) -> ImageData:
    """A harder set made from the digits, where raw pixels say little: each digit is rescaled to
    7..13 px and placed at a random position of a side x side canvas, drawn in amber on a blue
    background with a brightness gradient of random direction and slope (+-30%), then recoloured by
    one random colour jitter per image (brightness, contrast, saturation +-40%, hue +-0.1 turn:
    the range of the methods' own colour augmentation) and given pixel noise. Same fixed train /
    test split as ``digits()``; RGB uint8. kNN on raw pixels falls from 0.95 (digits) to 0.24."""
    import torch.nn.functional as F

    from fastcl.augment import color_jitter

    base = digits(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    background_rgb, digit_rgb = torch.tensor(BACKGROUND_RGB), torch.tensor(DIGIT_RGB)
    ramp = torch.linspace(-1, 1, side)

    def render(x: Tensor) -> Tensor:
        out = torch.empty(x.shape[0], 3, side, side)
        for i in range(x.shape[0]):
            k = int(torch.randint(7, 14, (1,), generator=g))
            glyph = F.interpolate(x[i:i + 1].float() / 255, size=(k, k), mode="bilinear",
                                  align_corners=False)[0, 0]
            top, left = (int(v) for v in torch.randint(0, side - k + 1, (2,), generator=g))
            mask = torch.zeros(side, side)
            mask[top:top + k, left:left + k] = glyph
            slope = float(torch.empty(1).uniform_(-0.3, 0.3, generator=g))
            direction = ramp[:, None] if bool(torch.rand(1, generator=g) < 0.5) else ramp[None, :]
            background = background_rgb[:, None, None] * (1 + slope * direction)
            out[i] = background * (1 - mask) + digit_rgb[:, None, None] * mask
        out = color_jitter(out.clamp(0, 1), g, brightness=0.4, contrast=0.4, saturation=0.4,
                           hue=0.1, p=1.0)
        out += 0.03 * torch.randn(out.shape, generator=g)
        return (out.clamp(0, 1) * 255).round().to(torch.uint8)

    # A digit spans down to 7 of the 16 px: crops under 10 px (39% of the area) miss most of it.
    return ImageData("digits-shift", render(base.x_train), base.y_train, render(base.x_test),
                     base.y_test, base.classes, mirror_invariant=False, min_crop_side=10)


def _as_nchw(name: str, x: np.ndarray) -> Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) images, uint8 or floats in [0, 1] -> uint8 NCHW.
    `name` says where the images come from in errors."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ValueError(f"{name} must hold images (N, H, W), (N, H, W, C) or (N, C, H, W) with "
                         f"C = 1 or 3, got shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{name} must be uint8 or float images, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} has NaN or infinite pixels (first at index "
                             f"{tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])}): "
                             f"expected values in [0, 1] or [0, 255]")
        top = float(x.max()) if x.size else 0.0
        x = np.clip(np.round(x * 255 if top <= 1.0 else x), 0, 255).astype(np.uint8)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"{name} must be square images (height = width), got "
                         f"{x.shape[3]}x{x.shape[2]} (width x height): crop or pad them first")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(name: str, y: np.ndarray, n: int, max_classes: int) -> Tensor:
    """Class indices 0..K-1, one per image, K at most `max_classes` (the number of images: more
    classes than images means labels that are not indices)."""
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{name} must have one label per image ({n}), got {len(y)}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)) | (y < 0) | (y >= max_classes))
    if len(bad):
        raise ValueError(f"{name} has label {y[bad[0]].item()!r} at index {bad[0]}: expected "
                         f"class indices 0..K-1 with K at most the {max_classes} images")
    return torch.from_numpy(y.astype(np.int64))


def _npz(path: Path) -> ImageData:
    where = f"of {str(path)!r}"
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
        if missing:
            raise ValueError(f"{str(path)!r} lacks {missing}: an .npz needs x_train, y_train, "
                             f"x_test, y_test (found {f.files})")
        x_train = _as_nchw(f"x_train {where}", f["x_train"])
        x_test = _as_nchw(f"x_test {where}", f["x_test"])
        n_images = len(x_train) + len(x_test)
        y_train = _labels(f"y_train {where}", f["y_train"], len(x_train), n_images)
        y_test = _labels(f"y_test {where}", f["y_test"], len(x_test), n_images)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"x_train and x_test {where} must have the same image shape, got "
                         f"{tuple(x_train.shape[1:])} and {tuple(x_test.shape[1:])}")
    classes = [str(c) for c in range(int(max(y_train.max(), y_test.max())) + 1)]
    return ImageData(path.stem, x_train, y_train, x_test, y_test, classes)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar(folder: Path) -> ImageData:
    def read(files: list[Path]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for file in files:
            batch = _unpickle(file)
            key = b"labels" if b"labels" in batch else b"fine_labels"
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[key]))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(
            np.concatenate(ys).astype(np.int64))

    if (folder / "data_batch_1").exists():
        train_files = sorted(folder.glob("data_batch_*"))
        test_file, meta, key = folder / "test_batch", folder / "batches.meta", b"label_names"
    else:
        train_files, test_file = [folder / "train"], folder / "test"
        meta, key = folder / "meta", b"fine_label_names"
    if not test_file.exists():
        raise ValueError(f"CIFAR folder {str(folder)!r} lacks its test batch {test_file.name!r}")
    x_train, y_train = read(train_files)
    x_test, y_test = read([test_file])
    n_classes = int(y_train.max()) + 1
    classes = [str(c) for c in range(n_classes)]
    if meta.exists():
        classes = [c.decode() for c in _unpickle(meta)[key]]
    return ImageData(folder.name, x_train, y_train, x_test, y_test, classes)


GRAY_MODES = ("L", "1", "I;16", "I")


def _image_folder(root: Path) -> ImageData:
    """Every image must have the same size and be square. Gray images load as 1 channel, unless any
    image of the data set is in colour: then all load as RGB (gray ones with R = G = B)."""
    from PIL import Image

    split_dirs = {"train": root / "train", "test": root / "val" if (root / "val").exists()
                  else root / "test"}
    for folder in split_dirs.values():
        if not folder.is_dir():
            raise ValueError(f"--data folder {str(root)!r}: {folder.name!r} is a file, expected a "
                             f"folder of class sub-folders ({folder.name}/<class>/<image>)")
    classes = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{str(split_dirs['train'])!r} has no class sub-folders (ImageFolder "
                         f"layout: train/<class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    arrays: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    size = None
    for split, folder in split_dirs.items():
        images, labels, skipped = [], [], []
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            if class_dir.name not in index:
                raise ValueError(f"class folder {str(class_dir)!r} is not among train/'s "
                                 f"classes {classes}")
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                try:
                    with Image.open(file) as im:
                        im.load()
                        arr = np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"))
                except (OSError, ValueError, SyntaxError):
                    skipped.append(file)
                    continue
                if size is None:
                    if arr.shape[0] != arr.shape[1]:
                        raise ValueError(f"images must be square: {str(file)!r} is "
                                         f"{arr.shape[1]}x{arr.shape[0]} (crop or pad the data set "
                                         f"first)")
                    size = arr.shape[:2]
                if arr.shape[:2] != size:
                    raise ValueError(f"images must all have the same size: {str(file)!r} is "
                                     f"{arr.shape[1]}x{arr.shape[0]}, the first image was "
                                     f"{size[1]}x{size[0]} (resize the data set first)")
                images.append(arr)
                labels.append(index[class_dir.name])
        if skipped:
            warnings.warn(f"skipped {len(skipped)} unreadable image file(s) in {str(folder)!r}, "
                          f"e.g. {str(skipped[0])!r}", RuntimeWarning, stacklevel=2)
        if not images:
            raise ValueError(f"{str(folder)!r} holds no readable images (ImageFolder layout: "
                             f"{folder.name}/<class>/<image>)")
        arrays[split] = images, labels
    rgb = any(a.ndim == 3 for images, _ in arrays.values() for a in images)
    out = {split: (_as_nchw(f"{split} images of {str(root)!r}", np.stack(
                       [np.repeat(a[..., None], 3, -1) if rgb and a.ndim == 2 else a
                        for a in images])),
                   torch.tensor(labels, dtype=torch.int64))
           for split, (images, labels) in arrays.items()}
    return ImageData(root.name, *out["train"], *out["test"], classes)


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[Tensor]:
    """Index batches (batch_size,) of one epoch: a permutation drawn from (seed, epoch), the same
    on every rank, each rank taking its own batch_size rows of every global batch; the last
    incomplete global batch is dropped (batch statistics and the losses want full batches)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    global_batch = batch_size * world_size
    for start in range(0, n - global_batch + 1, global_batch):
        yield order[start + rank * batch_size: start + (rank + 1) * batch_size]


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    return n // (batch_size * world_size)
