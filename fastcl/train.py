"""The trainer: data -> device augmentation -> method (-> loss module -> fused op) -> optimizer.

``train(TrainConfig(...))`` runs a method on a data set and writes, under ``config.out``:

- metrics.csv: one row per epoch (loss, lr, images/s, kNN top-1 on the test split, seconds);
- metrics.json: the final knn_top1 and linear_top1 (fractions in [0, 1]), the same two of the
  encoder before training ("baseline": the same architecture and seed, random init), the k of
  the kNN and the run's figures;
- curves.png: the loss and kNN curves, the baseline's kNN dashed;
- last.pt: the checkpoint, replaced after every epoch.

Every file is replaced whole (``write_atomic``: temporary file in the same folder, fsync,
os.replace), so an interrupted run always leaves the last complete ones; a temporary file that a
killed run left behind is removed when the next run of the folder starts. Options, data and the
checkpoint to resume are all checked before the output folder is made: bad input is a ValueError
that names the option or file, and nothing is written.

Randomness is a function of (seed, epoch, step): the epoch's order comes from (seed, epoch), a
streamed image's decode-time crop from (seed, epoch, image index) whatever worker decodes it, and
each step's augmentation generator is re-seeded from (seed, step, rank), so a run resumed from
last.pt (which holds the seed and the epoch) draws exactly what the uninterrupted run would have
drawn; with ``deterministic=True`` it reproduces it bit for bit.

Under torchrun (WORLD_SIZE > 1) each process joins a process group (NCCL on GPU, gloo on CPU),
takes its share of every global batch, the losses gather every rank's embeddings and gradients
are averaged over ranks after backward.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastcl import evaluate
from fastcl.data import (CACHE_CHOICES, ImageData, ImageFiles, default_workers, epoch_batches,
                         load_data, steps_per_epoch)
from fastcl.distributed import GATHERS, world
from fastcl.methods import RING_METHODS, get_method
from fastcl.models import BACKBONES, build_backbone
from fastcl.optim import OPTIMIZERS, build_optimizer, cosine_with_warmup, set_lr

CHECKPOINT_FORMAT = "fastcl-checkpoint-1"
PRECISIONS = ("fp32", "bf16")
TMP_INFIX = ".tmp-"  # write_atomic's temporary files: .<name>.tmp-<pid>


@dataclass
class TrainConfig:
    """Everything a run depends on. None means the method's default (Method.DEFAULTS)."""

    method: str = "simclr"
    data: Optional[str] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    optimizer: Optional[str] = None
    warmup_epochs: Optional[int] = None
    backbone: Optional[str] = None
    width: Optional[float] = None
    device: str = "auto"
    precision: str = "fp32"
    out: str = "runs/fastcl"
    resume: bool = False
    seed: int = 0
    deterministic: bool = False
    knn_k: int = 200
    image_size: Optional[int] = None  # an ImageFolder's side; None: its median shorter side
    workers: Optional[int] = None  # DataLoader processes decoding an ImageFolder; None: per CPU
    cache: str = "auto"  # an ImageFolder held in memory: auto (when small), always or never
    gather: str = "all"  # under torchrun, how the losses see every rank's embeddings: all or ring
    progress: bool = True
    hparams: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with the method's defaults filled in, after checking every choice."""
        method_cls = get_method(self.method)
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        values = asdict(self)
        for key, default in method_cls.DEFAULTS.items():
            if values.get(key) is None:
                values[key] = default
        if values["width"] is None:
            values["width"] = 1.0
        if values["workers"] is None:
            values["workers"] = default_workers()
        values["hparams"] = {k: self.hparams.get(k, d) for k, (d, _) in method_cls.HPARAMS.items()}
        cfg = TrainConfig(**values)
        _require("optimizer", cfg.optimizer, cfg.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
        _require("epochs", cfg.epochs, _is_int(cfg.epochs) and cfg.epochs >= 1, "an integer >= 1")
        _require("batch_size", cfg.batch_size, _is_int(cfg.batch_size) and cfg.batch_size >= 2,
                 "an integer >= 2 (BatchNorm and the losses compare the images of a batch)")
        _require("lr", cfg.lr, _is_real(cfg.lr) and cfg.lr > 0, "a finite number > 0")
        _require("weight_decay", cfg.weight_decay,
                 _is_real(cfg.weight_decay) and cfg.weight_decay >= 0, "a finite number >= 0")
        _require("width", cfg.width, _is_real(cfg.width) and cfg.width > 0, "a finite number > 0")
        if self.warmup_epochs is None:  # the method's default warm-up leaves an epoch of decay
            cfg.warmup_epochs = min(cfg.warmup_epochs, cfg.epochs - 1)
        _require("warmup_epochs", cfg.warmup_epochs, _is_int(cfg.warmup_epochs) and (
            cfg.warmup_epochs == 0 or 0 < cfg.warmup_epochs < cfg.epochs),
            f"an integer from 0 to --epochs - 1 = {cfg.epochs - 1} (the learning rate warms up to "
            f"its peak, then decays)")
        check_knn_k(cfg.knn_k)
        _require("image_size", cfg.image_size, cfg.image_size is None or _is_int(
            cfg.image_size) and cfg.image_size >= 4, "an integer >= 4 (pixels)")
        _require("workers", cfg.workers, _is_int(cfg.workers) and cfg.workers >= 0,
                 "an integer >= 0 (0 decodes in the training process)")
        _require("cache", cfg.cache, cfg.cache in CACHE_CHOICES, f"one of {CACHE_CHOICES}")
        _require("gather", cfg.gather, cfg.gather in GATHERS, f"one of {GATHERS}")
        if cfg.gather == "ring" and not method_cls.ring:
            raise ValueError(f"gather 'ring' is not available for {cfg.method}: its loss "
                             f"all-gathers (pass --gather all); methods with a ring: "
                             f"{list(RING_METHODS)}")
        return cfg


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return _is_int(value) or isinstance(value, float) and math.isfinite(value)


def _require(name: str, value, valid: bool, expected: str) -> None:
    """A ValueError naming the option (--name) unless `valid`."""
    if not valid:
        raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value!r}")


def check_knn_k(k) -> None:
    _require("knn_k", k, _is_int(k) and k >= 1,
             "an integer >= 1 (neighbours of the kNN evaluation)")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> the CUDA GPU of this process if there is one, else the CPU; a ValueError naming
    --device for a name torch does not know or a device this machine lacks."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, ...
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"--device {name}: this machine has no {device.type} device that torch "
                         f"can use; pass --device cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def _gather(cfg: TrainConfig, size: int):
    """The methods' gather argument for a world of `size` processes: False alone, else True
    (all-gather) or "ring"."""
    return size > 1 and ("ring" if cfg.gather == "ring" else True)


def build_method(cfg: TrainConfig, data_channels: int, image_size: int, mean, std, *,
                 flip: bool = True, gather: bool = False, num_items: int = 0,
                 min_crop_side: int = 6, backbone: Optional[nn.Module] = None) -> nn.Module:
    """cfg's method on cfg's backbone (or `backbone`, a module mapping (B, data_channels,
    image_size, image_size) to (B, backbone.out_dim), e.g. an ImageNet-size encoder)."""
    if backbone is None:
        backbone = build_backbone(cfg.backbone, in_channels=data_channels, image_size=image_size,
                                  width=cfg.width)
    return get_method(cfg.method)(backbone, image_size=image_size, mean=mean, std=std,
                                  flip=flip, gather=gather, num_items=num_items,
                                  min_crop_side=min_crop_side,
                                  **cfg.hparams)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Calls write(file) on a temporary file in path's folder, fsyncs it, then renames it over
    `path` (atomic on POSIX): readers see the old or the new file, never a partial one. An
    interrupted write removes its temporary file; one a killed process left behind is removed by
    ``remove_stale_temporaries`` when the next run starts."""
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: Path) -> None:
    """Removes the temporary files of writes that a killed run (kill -9) left in `folder`."""
    for tmp in folder.glob(f".*{TMP_INFIX}*"):
        tmp.unlink()


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    write_atomic(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load fails in many ways on a file it cannot read
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: expected a last.pt that "
                         f"fastcl train wrote, whole ({type(err).__name__}: "
                         f"{str(err).split('. ')[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a fastcl training checkpoint")
    return state


def check_compatible(state: dict, cfg: TrainConfig, data: ImageData,
                     path: str | os.PathLike) -> None:
    """A checkpoint resumes only the method, backbone, optimizer and data it was trained with, and
    only up to more epochs than it has."""
    trained = state["config"]
    if trained["method"] != cfg.method:
        raise ValueError(f"checkpoint {str(path)!r} was trained with method "
                         f"{trained['method']!r}, this run asks for {cfg.method!r}: run fastcl "
                         f"train {trained['method']} --resume, or pass another --out folder")
    for key in ("backbone", "width", "optimizer"):
        if trained[key] != getattr(cfg, key):
            raise ValueError(
                f"checkpoint {str(path)!r} was trained with {key} {trained[key]!r}, this run asks "
                f"for {getattr(cfg, key)!r}: pass --{key} {trained[key]} or another --out folder")
    info, shape = state["data"], (data.channels, data.image_size, len(data.x_train))
    trained_shape = (info["channels"], info["image_size"], info.get("num_items", shape[2]))
    if trained_shape != shape:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained on {info['name']!r} ({trained_shape[0]}-channel "
            f"{trained_shape[1]}px images, {trained_shape[2]} for training), --data gives "
            f"{data.name!r} ({shape[0]}-channel {shape[1]}px images, {shape[2]} for training): "
            f"pass the --data it was trained on, or another --out folder")
    if state["epoch"] > cfg.epochs:
        raise ValueError(f"--epochs {cfg.epochs} is fewer than the {state['epoch']} epochs "
                         f"checkpoint {str(path)!r} has trained: pass --epochs above "
                         f"{state['epoch']} to train on, or evaluate it with fastcl eval "
                         f"--checkpoint {path}")


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------
def _init_distributed(device: torch.device) -> tuple[int, int]:
    """Joins the torchrun process group when WORLD_SIZE > 1; returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world()


def _average_gradients(params: list[nn.Parameter], size: int) -> None:
    """Gradients averaged over ranks in one flat all-reduce (what DDP's buckets do)."""
    grads = [p.grad for p in params if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _broadcast_state(module: nn.Module) -> None:
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def _write_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_atomic(path, lambda f: f.write(text.getvalue().encode()))


def plot_curves(history: list[dict], path: Path, title: str, *, k: int,
                baseline_knn: Optional[float] = None) -> None:
    """Loss and kNN top-1 (k neighbours) per epoch, side by side, as a PNG; the kNN top-1 of the
    encoder before training dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [row["loss"] for row in history], marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_knn.plot(epochs, [row["knn_top1"] for row in history], marker="o", ms=3, color="C1",
                label="trained")
    if baseline_knn is not None:
        ax_knn.axhline(baseline_knn, ls="--", color="C7", label="random init")
        ax_knn.legend(loc="best", fontsize="small")
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1", title=f"kNN (k = {k}) on the test split")
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _features(method: nn.Module, data: ImageData, device, mean, std):
    """(train, test) features of the method's evaluation encoder (method.backbone)."""
    enc = method.backbone
    return (evaluate.extract_features(enc, data.x_train, mean=mean, std=std, device=device),
            evaluate.extract_features(enc, data.x_test, mean=mean, std=std, device=device))


def _probe(method: nn.Module, data: ImageData, device, mean, std, k: int) -> dict:
    """{knn_top1, linear_top1} of the method's evaluation encoder on the test split."""
    train_f, test_f = _features(method, data, device, mean, std)
    return dict(
        knn_top1=evaluate.knn_accuracy(train_f, data.y_train, test_f, data.y_test, k=k),
        linear_top1=evaluate.linear_probe_accuracy(train_f, data.y_train, test_f, data.y_test))


@dataclass
class _Run:
    """What the steps of one run share: the resolved options, where it runs, the data, the method
    and its optimizer, and the history of the epochs trained so far."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    size: int  # processes (torchrun's WORLD_SIZE)
    data: ImageData
    mean: list[float]  # the data's per-channel statistics
    std: list[float]
    method: nn.Module
    optimizer: torch.optim.Optimizer
    n_steps: int  # optimizer steps per epoch
    knn_k: int  # the kNN's k, capped for small classes (evaluate.capped_knn_k)
    out: Path
    baseline: dict = field(default_factory=dict)  # _probe of the encoder before training
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    made_out: bool = False  # the run made the output folder (removed again if left empty)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.n_steps


def train(config: TrainConfig, *, data: Optional[ImageData] = None,
          on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Runs (or resumes) a training run; returns the final metrics (as written to metrics.json).

    on_epoch_end(epoch, row) is called after each epoch's checkpoint is on disk.
    """
    # Options, data and the checkpoint to resume are checked before the output folder is made.
    run = _build(config, data)
    state = _checkpoint_to_resume(run) if run.cfg.resume else {}
    x_train, extra_sources = _training_source(run)
    if run.rank == 0:  # the encoder as built (no step taken), once per run: kept by a resume
        run.baseline = state.get("baseline") or _probe(run.method, run.data, run.device,
                                                       run.mean, run.std, run.knn_k)
    if state:
        _resume(run, state)
    _make_out(run)
    run.method.train()
    for epoch in range(run.start_epoch, run.cfg.epochs):
        stats = _train_epoch(run, epoch, x_train, extra_sources)
        _check_finite(run, epoch, stats["loss"])
        if run.rank == 0:
            row, knn = _evaluate_epoch(run, epoch, stats)
            run.history.append(row)
            _write_epoch(run, epoch)
            if run.cfg.progress:
                print(f"epoch {epoch + 1}/{run.cfg.epochs}  loss {stats['loss']:.4f}  "
                      f"kNN {knn:.4f}  {row['images_per_s']:.0f} img/s", flush=True)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
        if run.size > 1:
            dist.barrier()
    result = _finish(run) if run.rank == 0 else {}
    if run.size > 1:
        dist.barrier()
    return result


def _build(config: TrainConfig, data: Optional[ImageData]) -> _Run:
    """Resolves the options, joins the process group, loads the data and builds the method (seeded,
    on the device, the same on every rank) and its optimizer. Writes nothing."""
    cfg = config.resolved()
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    rank, size = _init_distributed(device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    data = data if data is not None else load_data(cfg.data, image_size=cfg.image_size,
                                                   workers=cfg.workers, cache=cfg.cache)
    mean, std = data.stats()

    torch.manual_seed(cfg.seed)
    method = build_method(cfg, data.channels, data.image_size, mean, std,
                          flip=data.mirror_invariant, gather=_gather(cfg, size),
                          num_items=len(data.x_train), min_crop_side=data.min_crop_side).to(device)
    if size > 1:
        _broadcast_state(method)
    optimizer = build_optimizer(cfg.optimizer, method, lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
    n_steps = steps_per_epoch(len(data.x_train), cfg.batch_size, size)
    if n_steps == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} x {size} process(es) is larger than the "
                         f"{len(data.x_train)} training images")
    return _Run(cfg, device, rank, size, data, mean, std, method, optimizer, n_steps,
                evaluate.capped_knn_k(cfg.knn_k, data.y_train), Path(cfg.out))


def _checkpoint_to_resume(run: _Run) -> dict:
    """last.pt of the output folder, after checking that it was trained with this run's method,
    backbone, optimizer and data."""
    state = load_checkpoint(run.ckpt_path)
    check_compatible(state, run.cfg, run.data, run.ckpt_path)
    return state


def _resume(run: _Run, state: dict) -> None:
    """Loads a checkpoint (_checkpoint_to_resume) into the run's method and optimizer."""
    try:
        run.method.load_state_dict(state["model"])
    except RuntimeError as err:
        changed = {k: v for k, v in state["config"]["hparams"].items()
                   if run.cfg.hparams.get(k) != v}
        raise ValueError(f"checkpoint {str(run.ckpt_path)!r} does not fit this run's model "
                         f"({str(err).splitlines()[-1].strip()}): it was trained with "
                         f"{changed}") from None
    run.optimizer.load_state_dict(state["optimizer"])
    run.history, run.start_epoch = state["history"], state["epoch"]


def _training_source(run: _Run) -> tuple[Tensor | ImageFiles, dict[str, Optional[Tensor]]]:
    """The training images (on the device, or the files to stream), and the sources of the
    per-batch extras the method asks for (Method.batch_extras) by name: "indices" (the batch's
    rows themselves) and "labels"."""
    extra_sources = {"indices": None, "labels": run.data.y_train.to(run.device)}
    x_train = run.data.x_train if run.data.streamed else run.data.x_train.to(run.device)
    unknown_extras = set(run.method.batch_extras) - set(extra_sources)
    if unknown_extras:
        raise ValueError(f"{run.cfg.method} asks for batch extras {sorted(unknown_extras)}; the "
                         f"trainer provides {sorted(extra_sources)}")
    return x_train, extra_sources


def _make_out(run: _Run) -> None:
    """Makes the output folder (rank 0) and removes the temporary files of a killed earlier run."""
    run.made_out = not run.out.exists()
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.out)


def _epoch_images(run: _Run, epoch: int, x_train: Tensor | ImageFiles):
    """The epoch's batches (images (B, C, S, S) uint8, indices (B,) int64), on the device: rows of
    the images in memory, or the files decoded by DataLoader workers (each image a random crop
    drawn from (seed, epoch, index); unreadable ones replaced by the next file, and counted)."""
    cfg, device = run.cfg, run.device
    batches = epoch_batches(len(x_train), cfg.batch_size, seed=cfg.seed, epoch=epoch,
                            rank=run.rank, world_size=run.size)
    if isinstance(x_train, Tensor):
        for idx in batches:
            idx = idx.to(device)
            yield x_train[idx], idx
        return
    unreadable = 0
    for images, idx, readable in x_train.loader([b.tolist() for b in batches],
                                                seed=(cfg.seed, epoch)):
        unreadable += int((~readable).sum())
        yield images.to(device, non_blocking=True), idx.to(device)
    if unreadable:
        warnings.warn(f"epoch {epoch + 1}: {unreadable} unreadable image file(s) replaced by the "
                      f"next readable one", RuntimeWarning, stacklevel=2)


def _train_epoch(run: _Run, epoch: int, x_train: Tensor | ImageFiles,
                 extra_sources: dict[str, Optional[Tensor]]) -> dict:
    """One epoch of optimizer steps: per step the scheduled lr, the augmentation generator
    re-seeded from (seed, step, rank), the method's loss, backward, gradients averaged over ranks,
    the method's hooks around the optimizer step. -> {loss (the epoch's mean), lr (the last
    step's), seen (images, all ranks), started (perf_counter), train_seconds}."""
    cfg, method, optimizer, device = run.cfg, run.method, run.optimizer, run.device
    params = [p for p in method.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    g = torch.Generator(device=device)
    warmup_steps = cfg.warmup_epochs * run.n_steps
    t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
    bar = _progress(cfg, run.rank, epoch, run.n_steps)
    for i, (images, idx) in enumerate(_epoch_images(run, epoch, x_train)):
        step = epoch * run.n_steps + i
        lr = cosine_with_warmup(step, run.total_steps, warmup_steps, cfg.lr)
        set_lr(optimizer, lr)
        g.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + run.rank)
        with torch.no_grad():
            views = method.augment(images, g)
        extras = {name: idx if name == "indices" else extra_sources[name][idx]
                  for name in method.batch_extras}
        with autocast:
            loss = method(views, epoch=epoch, **extras)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(params, run.size)
        method.after_backward(epoch)
        optimizer.step()
        method.after_step(step, run.total_steps)
        loss_sum += loss.detach()
        seen += len(idx) * run.size
        if bar is not None:
            bar.update(1)
            if i % 5 == 0 or i == run.n_steps - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t0
    return dict(loss=(loss_sum / run.n_steps).item(), lr=lr, seen=seen, started=t0,
                train_seconds=train_seconds)


def _check_finite(run: _Run, epoch: int, mean_loss: float) -> None:
    """A FloatingPointError naming the epoch, the checkpoint kept and the settings to change when
    the epoch's mean loss is NaN or infinite; an output folder the run made and never wrote to is
    removed."""
    if math.isfinite(mean_loss):
        return
    if run.rank == 0 and run.made_out and not any(run.out.iterdir()):
        run.out.rmdir()  # a run that never wrote anything leaves no empty folder behind
    kept = (f"the last good checkpoint is {run.ckpt_path} (epoch {epoch})" if epoch else
            "no checkpoint was written")
    cfg = run.cfg
    raise FloatingPointError(
        f"the loss became {mean_loss} in epoch {epoch + 1}/{cfg.epochs}; {kept}. Settings "
        f"that can cause it: --lr {cfg.lr}, --weight-decay {cfg.weight_decay}, "
        f"--warmup-epochs {cfg.warmup_epochs}, --precision {cfg.precision} (try a lower "
        f"--lr or a longer warm-up)")


def _evaluate_epoch(run: _Run, epoch: int, stats: dict) -> tuple[dict, float]:
    """The epoch's metrics row: mean loss, last lr, training images/s, kNN top-1 of the backbone's
    features on the test split, the method's own figures (Method.monitor) and the seconds of the
    epoch including this evaluation; and the kNN top-1 unrounded."""
    train_f, test_f = _features(run.method, run.data, run.device, run.mean, run.std)
    knn = evaluate.knn_accuracy(train_f, run.data.y_train, test_f, run.data.y_test, k=run.knn_k)
    monitor = run.method.monitor(run.data, mean=run.mean, std=run.std, device=run.device,
                                 k=run.knn_k)
    row = dict(epoch=epoch + 1, loss=round(stats["loss"], 6), lr=round(stats["lr"], 8),
               images_per_s=round(stats["seen"] / stats["train_seconds"], 1),
               knn_top1=round(knn, 5), **{key: round(value, 5) for key, value in monitor.items()},
               seconds=round(time.perf_counter() - stats["started"], 2))
    return row, knn


def _write_epoch(run: _Run, epoch: int) -> None:
    """Replaces last.pt (options, data description, sampler state, model, optimizer, history,
    baseline) and metrics.csv, each atomically. The sampler's state is (seed, epoch): the next
    epoch's order and decode-time crops are drawn from them alone."""
    data = run.data
    save_checkpoint(run.ckpt_path, dict(
        format=CHECKPOINT_FORMAT, config=asdict(run.cfg), epoch=epoch + 1,
        data=dict(name=data.name, channels=data.channels, image_size=data.image_size,
                  mean=run.mean, std=run.std, num_items=len(data.x_train),
                  streamed=data.streamed),
        sampler=dict(seed=run.cfg.seed, epoch=epoch + 1),
        model=run.method.state_dict(), optimizer=run.optimizer.state_dict(),
        history=run.history, baseline=run.baseline))
    _write_csv(run.out / "metrics.csv", run.history)


def _finish(run: _Run) -> dict:
    """The final kNN and linear-probe top-1 beside the encoder's before training (baseline), the
    kNN's k and the run's figures, written to metrics.json, and the curves of the history to
    curves.png; -> the metrics."""
    cfg, data, history = run.cfg, run.data, run.history
    result = dict(
        method=cfg.method, backbone=cfg.backbone, data=data.name, epochs=cfg.epochs,
        **_probe(run.method, data, run.device, run.mean, run.std, run.knn_k),
        baseline=run.baseline, knn_k=run.knn_k,
        images_per_s=round(sum(r["images_per_s"] for r in history) / max(1, len(history)), 1),
        train_seconds=round(sum(r["seconds"] for r in history), 1),
    )
    write_atomic(run.out / "metrics.json",
                 lambda f: f.write(json.dumps(result, indent=2).encode()))
    if history:
        plot_curves(history, run.out / "curves.png", f"{cfg.method} / {cfg.backbone} on "
                                                     f"{data.name}", k=run.knn_k,
                    baseline_knn=run.baseline["knn_top1"])
    return result


def summary_line(result: dict) -> str:
    """The final metrics beside the random-init baseline's, in one line."""
    base = result["baseline"]
    return (f"{result['method']} on {result['data']}: kNN top-1 {result['knn_top1']:.4f} "
            f"(random init {base['knn_top1']:.4f}, k = {result['knn_k']}), linear top-1 "
            f"{result['linear_top1']:.4f} (random init {base['linear_top1']:.4f})")


def _progress(cfg: TrainConfig, rank: int, epoch: int, n_steps: int):
    """The epoch's tqdm progress bar on rank 0 (None without --progress or on other ranks)."""
    if not cfg.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Evaluation of a checkpoint
# ----------------------------------------------------------------------------------------------
def evaluate_checkpoint(path: str | os.PathLike, data_path: Optional[str] = None, *,
                        device: str = "auto", k: int = 200) -> dict:
    """kNN and linear-probe top-1 of a checkpoint's frozen encoder on `data_path` (default: the
    data it was trained on)."""
    check_knn_k(k)
    dev = pick_device(device)
    state = load_checkpoint(path)
    cfg = TrainConfig(**state["config"])
    info = state["data"]
    data = load_data(data_path if data_path is not None else cfg.data,
                     image_size=info["image_size"] if _is_folder(data_path or cfg.data) else None,
                     workers=cfg.workers, cache=cfg.cache)
    if (data.channels, data.image_size) != (info["channels"], info["image_size"]):
        raise ValueError(f"checkpoint {str(path)!r} was trained on {info['channels']}-channel "
                         f"{info['image_size']}px images, --data has {data.channels}-channel "
                         f"{data.image_size}px images")
    method = build_method(cfg, info["channels"], info["image_size"], info["mean"], info["std"],
                          num_items=info.get("num_items", 0))
    method.load_state_dict(state["model"])
    method.to(dev)
    k = evaluate.capped_knn_k(k, data.y_train)
    return dict(checkpoint=str(path), method=cfg.method, backbone=cfg.backbone, data=data.name,
                epoch=state["epoch"], **_probe(method, data, dev, info["mean"], info["std"], k),
                knn_k=k)


def _is_folder(path: Optional[str]) -> bool:
    """Whether --data `path` is a folder of train/ and val/ or test/ (an ImageFolder, cut to the
    checkpoint's image size when evaluated)."""
    return path is not None and (Path(path) / "train").is_dir()
