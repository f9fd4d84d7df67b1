"""Methods table: every method trained with its defaults, against a random-init encoder of the
same architecture, on the embedded digits and on the harder digits-shift set.

    python benchmarks/methods.py --csv benchmarks/results/methods_cpu.csv       # all 15, both sets
    python benchmarks/methods.py --methods simclr byol --data digits --csv out.csv
    python benchmarks/methods.py --methods dinov2 --data digits --epochs 4 --csv out.csv
    python benchmarks/methods.py --render benchmarks/results/methods_cpu.csv --readme docs/methods.md

A run trains each (data set, method) in turn with the method's defaults (but for the OVERRIDES,
where the harder set needs a longer run), prints each row and appends it to --csv as soon as it
is measured; the CSV holds the history of runs (two runs with disjoint --methods can share the
machine's cores, one thread each). --render turns the newest row of each (data set, method) of a
CSV into the markdown table (kNN and linear-probe top-1 on the test split, the random-init
encoder's (the trainer's baseline), minutes of the whole run including evaluation, training images/s); with --readme it
replaces the table between the README's "methods-table" markers.
"""
from __future__ import annotations

import argparse
import csv
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from fastcl.data import load_data
from fastcl.methods import METHODS
from fastcl.train import TrainConfig, train
from harness import append_csv

README_MARKERS = ("<!-- methods-table:start -->", "<!-- methods-table:end -->")
# (data set, method) -> settings that replace the method's defaults, where it learns the harder
# set too slowly with its digits defaults. digits-shift kNN (random init 0.234): SwAV 0.253 after
# 15 epochs, 0.370 after 40; MoCo v2 0.240 after 30 epochs with its 1024-key queue, 0.287 with
# 128 keys, 0.421 with 128 keys after 60 epochs.
OVERRIDES = {
    ("digits-shift", "swav"): dict(epochs=40),
    ("digits-shift", "mocov2"): dict(epochs=60, queue_size=128),
}


def run(data_names: list[str], methods: list[str], csv_path: Optional[Path],
        epochs: Optional[int] = None) -> list[dict]:
    """Trains each (data set, method), for `epochs` if given; each row goes to csv_path as soon as
    it is measured."""
    rows = []
    for data_name in data_names:
        data = load_data(data_name)
        for method in methods:
            with tempfile.TemporaryDirectory() as out:
                settings = dict(OVERRIDES.get((data_name, method), {}))
                if epochs is not None:
                    settings["epochs"] = epochs
                cfg = TrainConfig(method=method, out=out, progress=False,
                                  epochs=settings.pop("epochs", None), hparams=settings).resolved()
                start = time.perf_counter()
                result = train(cfg, data=data)
                wall = time.perf_counter() - start
            rows.append(dict(
                data=data_name, method=method, backbone=f"{cfg.backbone} x{cfg.width}",
                epochs=cfg.epochs, batch_size=cfg.batch_size, knn_top1=round(result["knn_top1"], 4),
                linear_top1=round(result["linear_top1"], 4),
                random_knn_top1=round(result["baseline"]["knn_top1"], 4),
                random_linear_top1=round(result["baseline"]["linear_top1"], 4), images_per_s=result["images_per_s"],
                wall_s=round(wall, 1), threads=torch.get_num_threads(), torch=torch.__version__,
                machine=platform.processor() or platform.machine()))
            print(rows[-1], flush=True)
            if csv_path:
                append_csv(csv_path, rows[-1])
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The newest row of each (data, method), data sets then methods in registry order."""
    latest = {(r["data"], r["method"]): r for r in rows}
    data_order = list(dict.fromkeys(r["data"] for r in rows))  # first appearance
    method_order = list(METHODS)
    keys = sorted(latest, key=lambda k: (data_order.index(k[0]), method_order.index(k[1])
                                         if k[1] in method_order else len(method_order)))
    lines = ["| data | method | epochs | kNN top-1 | linear top-1 | random-init kNN / linear "
             "| gain (kNN) | minutes | images/s | threads |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key in keys:
        r = latest[key]
        knn, rand = float(r["knn_top1"]), float(r["random_knn_top1"])
        lines.append(
            f"| {r['data']} | {r['method']} | {r['epochs']} | {knn:.3f} | "
            f"{float(r['linear_top1']):.3f} | {rand:.3f} / {float(r['random_linear_top1']):.3f} | "
            f"{100 * (knn - rand):+.1f} | {float(r['wall_s']) / 60:.1f} | "
            f"{float(r['images_per_s']):.0f} | {r['threads']} |")
    return "\n".join(lines)


def write_readme(path: Path, table: str) -> None:
    """Replaces the text between the README's methods-table markers by `table`."""
    text = path.read_text()
    start, end = README_MARKERS
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {start} ... {end} markers")
    path.write_text(pattern.sub(lambda _: f"{start}\n{table}\n{end}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["digits", "digits-shift"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--csv", type=Path, help="append the rows to this CSV")
    parser.add_argument("--epochs", type=int, help="train every method this long instead")
    parser.add_argument("--render", type=Path, help="print the table of this CSV; train nothing")
    parser.add_argument("--readme", type=Path, help="write the table into this README")
    args = parser.parse_args()

    if args.render:
        with open(args.render, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = run(args.data, args.methods, args.csv, args.epochs)
    table = markdown_table(rows)
    print(table)
    if args.readme:
        write_readme(args.readme, table)


if __name__ == "__main__":
    main()
