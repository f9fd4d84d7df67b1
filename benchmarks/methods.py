"""Methods table: each method trained with its defaults, against a random-init encoder of the same
architecture, on the embedded digits and on the harder digits-shift set.

    python benchmarks/methods.py --data digits digits-shift --methods simclr swav mocov2 byol \
        --csv benchmarks/results/methods_cpu.csv

Prints a markdown table (kNN k = 200 and linear-probe top-1 on the test split, training images/s,
wall seconds of the whole run including evaluation) and appends rows to --csv.
"""
from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from pathlib import Path

import torch

from fastcl import evaluate
from fastcl.data import load_data
from fastcl.train import TrainConfig, build_method, train


def random_init(cfg: TrainConfig, data) -> tuple[float, float]:
    """kNN and linear top-1 of the untrained encoder the run starts from (same seed)."""
    mean, std = data.stats()
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, data.channels, data.image_size, mean, std,
                          flip=data.mirror_invariant, num_items=len(data.x_train))
    feats = [evaluate.extract_features(method.backbone, x, mean=mean, std=std)
             for x in (data.x_train, data.x_test)]
    return (evaluate.knn_accuracy(feats[0], data.y_train, feats[1], data.y_test),
            evaluate.linear_probe_accuracy(feats[0], data.y_train, feats[1], data.y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["digits", "digits-shift"])
    parser.add_argument("--methods", nargs="+", default=["simclr", "swav", "mocov2", "byol"])
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()

    rows = []
    for data_name in args.data:
        data = load_data(data_name)
        for method in args.methods:
            with tempfile.TemporaryDirectory() as out:
                cfg = TrainConfig(method=method, out=out, progress=False).resolved()
                rand_knn, rand_linear = random_init(cfg, data)
                start = time.perf_counter()
                result = train(cfg, data=data)
                wall = time.perf_counter() - start
            rows.append(dict(
                data=data_name, method=method, backbone=f"{cfg.backbone} x{cfg.width}",
                epochs=cfg.epochs, batch_size=cfg.batch_size, knn_top1=round(result["knn_top1"], 4),
                linear_top1=round(result["linear_top1"], 4), random_knn_top1=round(rand_knn, 4),
                random_linear_top1=round(rand_linear, 4), images_per_s=result["images_per_s"],
                wall_s=round(wall, 1), threads=torch.get_num_threads(), torch=torch.__version__,
                machine=platform.processor() or platform.machine()))
            print(rows[-1], flush=True)

    print("\n| data | method | kNN top-1 | linear top-1 | random-init kNN / linear | images/s "
          "| wall s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['data']} | {r['method']} | {r['knn_top1']:.3f} | {r['linear_top1']:.3f} | "
              f"{r['random_knn_top1']:.3f} / {r['random_linear_top1']:.3f} | "
              f"{r['images_per_s']:.0f} | {r['wall_s']:.0f} |")
    if args.csv:
        new = not args.csv.exists()
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
