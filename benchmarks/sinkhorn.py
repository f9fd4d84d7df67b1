"""Sinkhorn-Knopp benchmark: fastcl's fused SwAV code assignment against SwAV's own code (the naive
formula, fastcl.ops.sinkhorn.sinkhorn_ref) and, on a GPU, torch.compile of it, measured in the same
process.

    python benchmarks/sinkhorn.py                 # this machine's default device
    python benchmarks/sinkhorn.py --quick         # small sizes, a smoke test
    python benchmarks/sinkhorn.py --csv out.csv --plot out.png

Prints a table of median time and peak memory above the inputs for each case and implementation
(memory as in benchmarks/contrastive.py, whose measurement and output helpers this script uses).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from contrastive import environment, median_seconds, peak_memory, plot, print_table, write_csv
from fastcl.ops.sinkhorn import sinkhorn, sinkhorn_ref

MiB = 2**20


def cases(device: str, quick: bool):
    """(name, scores builder, {impl: fn(scores)}): SwAV's setting, eps 0.05, 3 iterations."""
    impls = {"fastcl": sinkhorn, "naive (SwAV)": sinkhorn_ref}
    k = 3000
    batches = [1024] if quick else [4096, 4096 + 3840]  # SwAV's batch, and with its queue
    for b in batches:
        def make_scores(b=b):
            z = torch.nn.functional.normalize(torch.randn(b, 128, device=device), dim=1)
            c = torch.nn.functional.normalize(torch.randn(k, 128, device=device), dim=1)
            return z @ c.T
        yield f"sinkhorn B={b} K={k} 3 iters", make_scores, impls


def run(device: str, quick: bool, repeats: int):
    rows = []
    for name, make_scores, impls in cases(device, quick):
        if device == "cuda":
            impls = dict(impls, **{"naive (SwAV) + torch.compile": torch.compile(sinkhorn_ref)})
        scores = make_scores()
        results = {}
        for impl, fn in impls.items():
            def step(fn=fn):
                return fn(scores, 0.05, 3)
            try:
                seconds = median_seconds(step, device, repeats)  # warms up first
                memory = peak_memory(step, device)
            except torch.OutOfMemoryError:
                memory = seconds = float("nan")
            results[impl] = (seconds, memory)
        baseline = results["naive (SwAV)"][0]
        for impl, (seconds, memory) in results.items():
            rows.append({"case": name, "impl": impl, "dtype": "float32", "ms": seconds * 1e3,
                         "speedup_vs_naive": baseline / seconds, "peak_extra_mib": memory / MiB})
        del scores
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per case")
    parser.add_argument("--csv", type=Path, help="write the rows to this CSV file")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    env = environment(args.device)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    rows = run(args.device, args.quick, args.repeats)
    print_table(rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, env, args.csv)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, env, args.plot, title="fastcl Sinkhorn-Knopp")


if __name__ == "__main__":
    main()
