"""Contrastive-loss benchmark: fastcl's fused losses against the naive formulas (and, on a GPU,
torch.compile of them), forward + backward, measured in the same process.

    python benchmarks/contrastive.py                 # this machine's default device
    python benchmarks/contrastive.py --quick         # small sizes, a smoke test
    python benchmarks/contrastive.py --csv out.csv --plot out.png

Prints a table of median time and peak memory above the inputs for each case and implementation.
CPU memory is the peak resident set size above the level before the call (Linux VmHWM, reset per
measurement); CUDA memory is torch's peak allocation above the inputs.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fastcl
from fastcl import formulas, info_nce, nt_xent, supcon

MiB = 2**20


# --- measurement -------------------------------------------------------------------------------
def _rss_field(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(step, device: str) -> float:
    """Peak memory (bytes) that one call of step() needs above what is allocated before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so RSS is the live set
    before = _rss_field("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets the VmHWM high-water mark
    step()
    return _rss_field("VmHWM:") - before


def median_seconds(step, device: str, repeats: int) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(step, warmup=5, rep=max(repeats, 1) * 20, return_mode="median") / 1e3
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(loss_fn, inputs):
    """A closure running loss_fn(*inputs).backward(), freeing the gradients afterwards."""
    def step():
        loss = loss_fn(*inputs)
        loss.backward()
        for x in inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None
    return step


# --- cases -------------------------------------------------------------------------------------
def unit(*shape, device, dtype, grad=True):
    x = torch.nn.functional.normalize(torch.randn(*shape, device=device), dim=-1).to(dtype)
    return x.requires_grad_(grad)


def cases(device: str, quick: bool):
    """(name, dtype, inputs builder, {impl: loss_fn}) for this device."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    big = 1 if quick else (4 if device == "cuda" else 1)
    two_n = (2048 if quick else 16384) * big
    yield (f"nt_xent 2N={two_n} D=128", dtype,
           lambda: [unit(two_n // 2, 128, device=device, dtype=dtype),
                    unit(two_n // 2, 128, device=device, dtype=dtype)],
           {"fastcl": nt_xent, "naive": formulas.nt_xent})
    if not quick:
        huge = 65536 if device == "cpu" else 131072
        yield (f"nt_xent 2N={huge} D=128", dtype,
               lambda: [unit(huge // 2, 128, device=device, dtype=dtype),
                        unit(huge // 2, 128, device=device, dtype=dtype)],
               {"fastcl": nt_xent})
    k = 8192 if quick else 65536
    yield (f"info_nce N=256 queue={k} D=128 (MoCo)", dtype,
           lambda: [unit(256, 128, device=device, dtype=dtype),
                    unit(256, 128, device=device, dtype=dtype),
                    unit(k, 128, device=device, dtype=dtype, grad=False)],
           {"fastcl": info_nce, "naive": formulas.info_nce})
    n = (1024 if quick else 8192) * big
    yield (f"info_nce symmetric N={n} D=128", dtype,
           lambda: [unit(n, 128, device=device, dtype=dtype), unit(n, 128, device=device, dtype=dtype)],
           {"fastcl": lambda q, k: info_nce(q, k, symmetric=True),
            "naive": lambda q, k: formulas.info_nce(q, k, symmetric=True)})
    labels = torch.randint(0, 100, (n,), device=device)
    yield (f"supcon M={n} D=128 100 classes", dtype,
           lambda: [unit(n, 128, device=device, dtype=dtype)],
           {"fastcl": lambda f: supcon(f, labels), "naive": lambda f: formulas.supcon(f, labels)})


def run(device: str, quick: bool, repeats: int, only: str = ""):
    rows = []
    for name, dtype, make_inputs, impls in cases(device, quick):
        if only not in name:
            continue
        if device == "cuda":
            impls = dict(impls, **{f"{k} + torch.compile": torch.compile(v)
                                   for k, v in impls.items() if k.startswith("naive")})
        inputs = make_inputs()
        steps = {impl: forward_backward(fn, inputs) for impl, fn in impls.items()}
        rows += measure_case(name, dtype, steps, device, repeats, baseline="naive")
        del inputs, steps
    return rows


def measure_case(case, dtype, steps, device, repeats, baseline):
    """Table rows for one case: each implementation's step() timed and its peak memory measured
    in this process; speed-ups are relative to the implementation named `baseline`."""
    results = {}
    for impl, step in steps.items():
        try:
            seconds = median_seconds(step, device, repeats)  # warms up first
            memory = peak_memory(step, device)
        except torch.OutOfMemoryError:
            seconds = memory = float("nan")
        results[impl] = (seconds, memory)
    base = results[baseline][0] if baseline in results else float("nan")
    return [{"case": case, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
             "ms": seconds * 1e3, "speedup_vs_naive": base / seconds,
             "peak_extra_mib": memory / MiB} for impl, (seconds, memory) in results.items()]


# --- output ------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {"device": f"{device}: {name}", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "fastcl": fastcl.__version__, "commit": commit,
            "date": datetime.date.today().isoformat()}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return platform.processor() or "cpu"


def print_table(rows):
    header = f"{'case':36} {'impl':26} {'dtype':9} {'ms':>10} {'speedup':>8} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:36} {r['impl']:26} {r['dtype']:9} {r['ms']:10.1f} "
              f"{r['speedup_vs_naive']:7.2f}x {r['peak_extra_mib']:9.1f}")


def markdown_table(rows) -> str:
    lines = ["| case | implementation | ms | speed-up vs naive | peak MiB above inputs |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        speedup = "" if r["speedup_vs_naive"] != r["speedup_vs_naive"] else f"{r['speedup_vs_naive']:.2f}x"
        lines.append(f"| {r['case']} | {r['impl']} | {r['ms']:.1f} | {speedup} | "
                     f"{r['peak_extra_mib']:.1f} |")
    return "\n".join(lines)


def write_csv(rows, env, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *env])
        writer.writeheader()
        writer.writerows({**r, **env} for r in rows)


def plot(rows, env, path, title="fastcl contrastive losses"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_names = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.6 * len(case_names) + 2.5))
    for ax, key, label in [(axes[0], "ms", "forward + backward (ms, log)"),
                           (axes[1], "peak_extra_mib", "peak memory above inputs (MiB, log)")]:
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = {r["case"]: r[key] for r in rows if r["impl"] == impl}
            ys = [c for c in range(len(case_names)) if case_names[c] in values]
            ax.barh([y + i * width for y in ys], [values[case_names[y]] for y in ys], width,
                    label=impl)
        ax.set_yticks([y + 0.4 - width / 2 for y in range(len(case_names))], case_names)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}, {env['device']}, torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_main(description, run, title, default_repeats=5):
    """The command line every benchmark shares: run(device, quick, repeats, only) -> rows."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=default_repeats,
                        help="timed repetitions per case")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--csv", type=Path, help="write the rows to this CSV file")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart to this file")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    env = environment(args.device)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    rows = run(args.device, args.quick, args.repeats, args.only)
    print_table(rows)
    if args.markdown:
        print(markdown_table(rows))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, env, args.csv)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, env, args.plot, title)


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], run, "fastcl contrastive losses")
