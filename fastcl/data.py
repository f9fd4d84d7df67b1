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

Arrays and small ImageFolders are held in memory as uint8 tensors, so an epoch is a permutation
of indices and a batch one gather. A larger ImageFolder is streamed (ImageFiles): torch DataLoader
workers decode each batch's files and cut each image to --image-size (a random crop for training,
the centred square for evaluation), so memory is bounded by the batch and the workers' prefetch.
The rest of the augmentation happens afterwards on the training device (fastcl.augment).
"""
from __future__ import annotations

import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class ImageData:
    """x_*: (N, C, H, W) uint8 in memory, or ImageFiles streamed from disk; y_*: (N,) int64;
    classes names the labels.

    mirror_invariant: whether a horizontal flip keeps an image's meaning (natural images: yes,
    handwriting: no); the augmentations flip only then. min_crop_side: the smallest random crop,
    in pixels, that still shows enough of the object; the methods raise their crop ranges to it
    (their ImageNet ranges go down to 28% of the side, which binds only on small images)."""

    name: str
    x_train: Tensor | ImageFiles
    y_train: Tensor
    x_test: Tensor | ImageFiles
    y_test: Tensor
    classes: list[str]
    mirror_invariant: bool = True
    min_crop_side: int = 6

    @property
    def streamed(self) -> bool:
        return isinstance(self.x_train, ImageFiles)

    @property
    def channels(self) -> int:
        return self.x_train.channels if self.streamed else self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.size if self.streamed else self.x_train.shape[-1]

    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in [0, 1] units (of STATS_SAMPLE
        evenly spaced ones when streamed)."""
        x = self.x_train
        if self.streamed:
            x = x.read(np.linspace(0, len(x) - 1, min(len(x), STATS_SAMPLE)).astype(int).tolist())[0]
        x = x.float() / 255
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()


def load_data(path: Optional[str | os.PathLike] = None, *, image_size: Optional[int] = None,
              workers: int = 0, cache: str = "auto") -> ImageData:
    """The data set at `path` (see the module docstring), or the embedded digits for None.

    An ImageFolder's images are cut to image_size (default: the median shorter side of its
    training images) and decoded by `workers` DataLoader processes; cache: "auto" (held in
    memory up to CACHE_BYTES, else streamed), "always" or "never". The other formats have one
    image size, which image_size (when given) must equal."""
    data = _load(path, image_size, workers, cache)
    if image_size is not None and image_size != data.image_size:
        raise ValueError(f"--image-size {image_size}: the images of {data.name!r} are "
                         f"{data.image_size} px; only an ImageFolder is cut to another size")
    return data


def _load(path, image_size: Optional[int], workers: int, cache: str) -> ImageData:
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
        return _image_folder(p, image_size, workers, cache)
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
# The decode-time crop of streamed training images (torchvision RandomResizedCrop's sampling, see
# crop_box): it picks the region of the image that the method's recipes then cut every view from
# on the device, with their own crop ranges (multi-crop's small crops included). A quarter of the
# image or more, so that the two crops compound to no less than a quarter of each recipe's range.
DECODE_SCALE, DECODE_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)
# --cache auto holds an ImageFolder in memory when its images, cut to --image-size, take at most
# this many bytes (decoded once instead of every epoch); larger ones are streamed from disk.
CACHE_BYTES = 128 * 2 ** 20
CACHE_CHOICES = ("auto", "always", "never")
STATS_SAMPLE = 1024  # images that estimate a streamed data set's mean and std


def default_workers() -> int:
    """DataLoader decoding processes: one per CPU but one (left to the training step), 1 to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) - 1))


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop of a width x height image, drawn as torchvision's
    ``RandomResizedCrop.get_params`` does (torchvision/transforms/transforms.py): up to 10 tries
    of an area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`, kept when
    the crop fits the image, at a uniform position; else the centred crop of the whole image with
    its aspect ratio clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_image(path: str, mode: str, size: int,
                 rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The image at `path` converted to `mode` ("L" or "RGB") and cut to size x size: a crop_box
    with DECODE_SCALE and DECODE_RATIO drawn from `rng` (training), or without `rng` the centred
    square (evaluation: resize of the shorter side + centre crop); bilinear (antialiased) resize.
    -> (size, size) or (size, size, 3) uint8. Raises OSError (or ValueError, SyntaxError) for a
    file that PIL cannot decode."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        if rng is None:
            side = min(width, height)
            left, top, w, h = (width - side) // 2, (height - side) // 2, side, side
        else:
            left, top, w, h = crop_box(width, height, DECODE_SCALE, DECODE_RATIO, rng)
        # JPEG decodes at a power-of-two reduction (DCT scaling) that keeps the crop >= size px.
        im.draft(mode, (math.ceil(width * size / w), math.ceil(height * size / h)))
        sx, sy = im.size[0] / width, im.size[1] / height
        image = im.convert(mode) if im.mode != mode else im
        image = image.resize((size, size), Image.BILINEAR,
                             box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        return np.array(image)


@dataclass(frozen=True)
class ImageFiles:
    """Images on disk, decoded when a batch asks for them by `workers` DataLoader processes (0: in
    this process): each converted to `mode` ("L", or "RGB" when any image of the data set is in
    colour) and cut to a size x size square, whatever its own size and mode."""

    paths: tuple[str, ...]
    mode: str
    size: int
    workers: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def loader(self, batches: list[list[int]], seed: Optional[Sequence[int]] = None):
        """A DataLoader of the index `batches` that yields (images (B, C, size, size) uint8,
        indices (B,) int64, readable (B,) bool). With `seed` (training), each image is a random
        crop drawn from (seed..., index), the same whatever worker decodes it; without, the centred
        square. An unreadable file is replaced by the next readable one (its index returned,
        readable False)."""
        from torch.utils.data import DataLoader

        return DataLoader(_Decoder(self, None if seed is None else tuple(seed)),
                          batch_sampler=batches, num_workers=self.workers,
                          prefetch_factor=2 if self.workers else None)

    def read(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """The centred squares of the images at `indices`: (N, C, size, size) uint8 of the
        readable ones, and the (N,) indices they are."""
        chunks = [list(indices[i:i + 256]) for i in range(0, len(indices), 256)]
        images, kept = [], []
        for x, index, readable in self.loader(chunks):
            images.append(x[readable])
            kept.append(index[readable])
        return torch.cat(images), torch.cat(kept)


class _Decoder:
    """The map-style dataset behind ImageFiles.loader: index -> (image, index, readable)."""

    def __init__(self, files: ImageFiles, seed: Optional[tuple[int, ...]]):
        self.files, self.seed = files, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int, bool]:
        files, n = self.files, len(self.files)
        for attempt in range(n):
            i = (index + attempt) % n
            rng = None if self.seed is None else np.random.default_rng(
                [s % 2 ** 63 for s in (*self.seed, i)])
            try:
                array = decode_image(files.paths[i], files.mode, files.size, rng)
            except (OSError, ValueError, SyntaxError):
                continue
            image = torch.from_numpy(array.reshape(files.size, files.size, -1)).permute(2, 0, 1)
            return image.contiguous(), i, attempt == 0
        raise ValueError(f"none of the {n} images can be decoded, e.g. {files.paths[index]!r}")


def _scan(root: Path, folder: Path, index: dict[str, int]):
    """(paths, labels, (width, height) and mode of each) of the images of one split, from their
    headers; files that PIL cannot open are skipped with a warning that counts them."""
    from PIL import Image

    paths, labels, sizes, modes, skipped = [], [], [], [], []
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
        if class_dir.name not in index:
            raise ValueError(f"class folder {str(class_dir)!r} is not among train/'s "
                             f"classes {sorted(index)}")
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(file) as im:
                    size, mode = im.size, im.mode
            except (OSError, ValueError, SyntaxError):
                skipped.append(file)
                continue
            paths.append(str(file))
            labels.append(index[class_dir.name])
            sizes.append(size)
            modes.append(mode)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) in {str(folder)!r}, "
                      f"e.g. {str(skipped[0])!r}", RuntimeWarning, stacklevel=3)
    if not paths:
        raise ValueError(f"{str(folder)!r} holds no readable images (ImageFolder layout: "
                         f"{folder.name}/<class>/<image>)")
    return paths, labels, sizes, modes


def _image_folder(root: Path, image_size: Optional[int], workers: int, cache: str) -> ImageData:
    """Images of any size and mode, cut to image_size (default: the median of the training images'
    shorter sides). Gray images load as 1 channel, unless any image of the data set is in colour:
    then all load as RGB (gray ones with R = G = B). Held in memory (centred squares) when --cache
    says so, else streamed (ImageFiles)."""
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
    scans = {split: _scan(root, folder, index) for split, folder in split_dirs.items()}
    mode = "L" if all(m in GRAY_MODES for *_, modes in scans.values() for m in modes) else "RGB"
    size = image_size or int(np.median([min(s) for s in scans["train"][2]]))
    splits = {split: (ImageFiles(tuple(paths), mode, size, workers),
                      torch.tensor(labels, dtype=torch.int64))
              for split, (paths, labels, _, _) in scans.items()}
    n_bytes = sum(len(files) for files, _ in splits.values()) * (3 if mode == "RGB" else 1) * size ** 2
    if cache == "always" or cache == "auto" and n_bytes <= CACHE_BYTES:
        for split, (files, labels) in list(splits.items()):
            images, kept = files.read(range(len(files)))
            if len(kept) < len(files):
                warnings.warn(f"skipped {len(files) - len(kept)} unreadable image file(s) in "
                              f"{str(split_dirs[split])!r}", RuntimeWarning, stacklevel=2)
            splits[split] = images, labels[kept]
    return ImageData(root.name, *splits["train"], *splits["test"], classes)


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
