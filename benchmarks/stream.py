"""A streamed ImageFolder: make one of any size, measure its loader alone, the training step alone,
and the memory of a whole run.

    python benchmarks/stream.py make /tmp/folder --train 20000 --val 1000 --side 256
    python benchmarks/stream.py load /tmp/folder --image-size 64 --workers 1 --batches 60
    python benchmarks/stream.py step --image-size 64 --batch-size 64 --width 0.25 --steps 20
    python benchmarks/stream.py watch -- fastcl train simclr --data /tmp/folder ...

``make`` writes train/ and val/ folders of 10 classes of side x side JPEGs (quality 90): a disc of
the class's colour at a random place and size on a random gradient, with pixel noise, so the set
compresses like photographs and a method has something to learn. ``load`` times the trainer's
loader (``ImageFiles.loader``: decode, random-resized crop to --image-size, collate) over
--batches batches of --batch-size, after one warm-up batch, and prints images/s. ``step`` times
SimCLR's training step alone (device augmentation, forward, backward, optimizer) on one random
uint8 batch held in memory, after two warm-up steps. ``watch`` runs a command and samples, every
second, the memory of its whole process tree (the trainer and its DataLoader workers): the peak of
the summed proportional set sizes (PSS: shared pages divided among the processes sharing them, so
the sum is what the tree holds) and of the summed resident set sizes (RSS: shared pages counted in
every process). benchmarks/README.md has the figures.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import time
from pathlib import Path

import numpy as np

# The classes' disc colours (RGB in [0, 1]).
PALETTE = [(0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.2, 0.9), (0.9, 0.9, 0.1), (0.9, 0.1, 0.9),
           (0.1, 0.9, 0.9), (0.95, 0.55, 0.1), (0.5, 0.1, 0.7), (0.6, 0.6, 0.6), (0.3, 0.15, 0.05)]


def make(root: Path, n_train: int, n_val: int, side: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:side, 0:side] / side).astype(np.float32)
    noise = rng.normal(0, 0.03, (8, side, side, 3)).astype(np.float32)  # drawn once, reused
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = i % len(PALETTE)
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            angle = rng.uniform(0, 2 * np.pi)
            ramp = np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy
            low, high = rng.uniform(0, 1, (2, 3)).astype(np.float32)
            image = low + (high - low) * ramp[..., None] / 2 + 0.25
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2)[..., None]
            image = np.where(disc, np.array(PALETTE[c], np.float32), image)
            image += noise[i % len(noise)]
            pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def load(root: Path, image_size: int, workers: int, batch_size: int, batches: int) -> None:
    from fastcl.data import load_data

    files = load_data(root, image_size=image_size, workers=workers, cache="never").x_train
    order = np.random.default_rng(0).permutation(len(files))[:(batches + 1) * batch_size]
    index_batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    loader = iter(files.loader(index_batches, seed=(0, 0)))
    next(loader)  # the workers start and fill their prefetch
    t0, cpu0, n = time.perf_counter(), _cpu_seconds(), 0
    for images, _, _ in loader:
        n += images.shape[0]
    seconds = time.perf_counter() - t0
    del loader  # the workers exit, and their CPU time is counted
    cpu = _cpu_seconds() - cpu0
    print(f"loader: {n} images of {len(files)} at {image_size} px, {workers} worker(s): "
          f"{n / seconds:.0f} images/s, {n / cpu:.0f} images per CPU second")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def step(image_size: int, batch_size: int, width: float, steps: int) -> None:
    import torch

    from fastcl.optim import build_optimizer
    from fastcl.train import TrainConfig, build_method

    cfg = TrainConfig(method="simclr", width=width, batch_size=batch_size).resolved()
    torch.manual_seed(0)
    method = build_method(cfg, 3, image_size, [0.5] * 3, [0.25] * 3)
    optimizer = build_optimizer(cfg.optimizer, method, lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 2):
        if i == 2:
            t0, cpu0 = time.perf_counter(), _cpu_seconds()
        with torch.no_grad():
            views = method.augment(images, g)
        loss = method(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    n = steps * batch_size
    print(f"training step: SimCLR, ResNet-18 x{width}, batch {batch_size} at {image_size} px, "
          f"{torch.get_num_threads()} thread(s): {n / seconds:.0f} images/s, {n / cpu:.0f} "
          f"images per CPU second")


def _tree(pid: int) -> list[int]:
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB (0, 0 once it has exited)."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except OSError:
        return 0, 0
    return int(fields["Pss"].split()[0]), int(fields["Rss"].split()[0])


def watch(command: list[str]) -> int:
    proc = subprocess.Popen(command)
    peak_pss = peak_rss = 0
    t0 = time.perf_counter()
    while proc.poll() is None:
        pss, rss = map(sum, zip(*(_memory_kib(p) for p in _tree(proc.pid))))
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(1.0)
    print(f"exit {proc.returncode} after {time.perf_counter() - t0:.0f} s; peak memory of the "
          f"process tree: PSS {peak_pss / 1024:.0f} MiB, RSS {peak_rss / 1024:.0f} MiB")
    return proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("root", type=Path)
    m.add_argument("--train", type=int, default=20000)
    m.add_argument("--val", type=int, default=1000)
    m.add_argument("--side", type=int, default=256)
    m_load = sub.add_parser("load")
    m_load.add_argument("root", type=Path)
    m_load.add_argument("--image-size", type=int, default=64)
    m_load.add_argument("--workers", type=int, default=1)
    m_load.add_argument("--batch-size", type=int, default=128)
    m_load.add_argument("--batches", type=int, default=60)
    m_step = sub.add_parser("step")
    m_step.add_argument("--image-size", type=int, default=64)
    m_step.add_argument("--batch-size", type=int, default=64)
    m_step.add_argument("--width", type=float, default=0.25)
    m_step.add_argument("--steps", type=int, default=20)
    m_watch = sub.add_parser("watch")
    m_watch.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args()
    if args.command == "make":
        make(args.root, args.train, args.val, args.side)
    elif args.command == "load":
        load(args.root, args.image_size, args.workers, args.batch_size, args.batches)
    elif args.command == "step":
        step(args.image_size, args.batch_size, args.width, args.steps)
    else:
        raise SystemExit(watch(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd))


if __name__ == "__main__":
    main()
