"""DINO-loss benchmark: fastcl's fused dino_loss against the official DINO formula (and, on a GPU,
torch.compile of it), measured in the same process: forward + backward, and forward alone.

    python benchmarks/dino.py                 # B = 64, S = 10, T = 2, K = 65536 (DINO, per GPU)
    python benchmarks/dino.py --quick         # K = 8192, a smoke test
    python benchmarks/dino.py --csv out.csv --plot out.png

Time is the median of --repeats runs; memory is the peak above the inputs during one run (CPU:
resident set size, GPU: torch's allocator), with the helpers of benchmarks/contrastive.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from contrastive import (MiB, environment, forward_backward, median_seconds, peak_memory, plot,
                         print_table, write_csv)
from fastcl.losses.dino import dino_loss, dino_loss_ref


def forward_only(loss_fn, inputs):
    """A closure running loss_fn(*inputs) with autograd recording (what backward would keep)."""
    def step():
        loss_fn(*inputs)
    return step


def make_inputs(s, t, b, k, device, dtype):
    """DINO-like logits: student (S, B, K) requiring grad, teacher (T, B, K), center (1, K)."""
    student = torch.randn(s, b, k, device=device).to(dtype).requires_grad_()
    teacher = torch.randn(t, b, k, device=device).to(dtype)
    center = 0.1 * torch.randn(1, k, device=device)
    return [student, teacher, center]


def run(device: str, quick: bool, repeats: int):
    s, t, b, k = 10, 2, 64, 8192 if quick else 65536
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = {"fastcl": dino_loss, "official (DINO code)": dino_loss_ref}
    if device == "cuda":
        impls["official + torch.compile"] = torch.compile(dino_loss_ref)
    inputs = make_inputs(s, t, b, k, device, dtype)
    rows = []
    for mode, closure in [("fwd+bwd", forward_backward), ("fwd", forward_only)]:
        case = f"dino S={s} T={t} B={b} K={k} {mode}"
        results = {}
        for impl, loss_fn in impls.items():
            step = closure(loss_fn, inputs)
            try:
                seconds = median_seconds(step, device, repeats)  # warms up first
                memory = peak_memory(step, device)
            except torch.OutOfMemoryError:
                seconds = memory = float("nan")
            results[impl] = (seconds, memory)
        baseline = results["official (DINO code)"][0]
        for impl, (seconds, memory) in results.items():
            rows.append({"case": case, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
                         "ms": seconds * 1e3, "speedup_vs_naive": baseline / seconds,
                         "peak_extra_mib": memory / MiB})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="K = 8192 (smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per case")
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
        plot(rows, env, args.plot, title="fastcl DINO loss")


if __name__ == "__main__":
    main()
