"""gather=True against gather="ring" on W gloo processes of this machine: one training step
(forward + backward) of CLIP's symmetric InfoNCE with a learnable temperature, at growing N rows
per rank (D = 128). Per rank: the peak of torch's allocator above the inputs during the step
(harness.peak_allocated: the profiler's allocation events on CPU, the gathered rows and received
blocks included) and the step time (median of --repeats steps, the two modes interleaved, ranks
started together by a barrier; the slowest rank's time is the step's).

    python benchmarks/ring.py --csv benchmarks/results/ring_cpu.csv --markdown
    python benchmarks/ring.py --quick            # 2 processes, tiny sizes (the smoke test)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import harness
from fastcl import info_nce

D = 128
MODES = (True, "ring")


def _step(q, k, temperature, gather):
    def step():
        q.grad = k.grad = temperature.grad = None
        info_nce(q, k, temperature=temperature, symmetric=True, gather=gather).backward()
    return step


def _rank_main(rank, world, folder, sizes, repeats):
    """One rank: measures every size; rank 0 prints each size's rows as they come and writes them
    all to folder/rows.json."""
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(rank)
        rows = []
        for n in sizes:
            q = torch.randn(n, D, requires_grad=True)
            k = torch.randn(n, D, requires_grad=True)
            temperature = torch.tensor(0.07, requires_grad=True)
            steps = {mode: _step(q, k, temperature, mode) for mode in MODES}
            for step in steps.values():  # warm-up
                step()
            peak = {mode: harness.peak_allocated(step, "cpu") for mode, step in steps.items()}
            times = {mode: [] for mode in MODES}
            for _ in range(repeats):
                for mode, step in steps.items():
                    dist.barrier()
                    start = time.perf_counter()
                    step()
                    times[mode].append(time.perf_counter() - start)
            mine = {mode: (peak[mode], statistics.median(times[mode])) for mode in MODES}
            every = [None] * world
            dist.all_gather_object(every, mine)
            if rank == 0:
                for mode in MODES:
                    # The largest peak and the slowest rank's median step.
                    row = {"world": world, "n_per_rank": n, "rows": world * n,
                           "gather": str(mode), "mib": max(r[mode][0] for r in every) / 2**20,
                           "ms": 1e3 * max(r[mode][1] for r in every),
                           "load_1min": os.getloadavg()[0]}
                    print(f"W={world} N={n:6} W*N={world * n:7} gather={row['gather']:5} "
                          f"{row['mib']:9.1f} MiB {row['ms']:9.0f} ms", flush=True)
                    rows.append(row)
        if rank == 0:
            Path(folder, "rows.json").write_text(json.dumps(rows))
        dist.barrier()  # every rank done with the group before any tears it down
    finally:
        dist.destroy_process_group()
    # A rank's interpreter shutdown could abort ("terminate called without an active exception",
    # about one run in six here, after every row was measured and written): a native thread left
    # joinable at exit. The results are written and the group is gone, so the rank leaves at once.
    os._exit(0)


def measure(world: int, sizes: list, repeats: int) -> list:
    """Rows {world, n_per_rank, rows, gather, mib, ms, load_1min}, a size's two modes in turn."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(world, folder, sizes, repeats), nprocs=world, join=True)
        return json.loads(Path(folder, "rows.json").read_text())


def markdown_table(rows) -> str:
    lines = ["| W | N per rank | W x N | gather | peak MiB per rank | step ms | load |",
             "| ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['n_per_rank']} | {r['rows']} | {r['gather']} | "
                     f"{float(r['mib']):.1f} | {float(r['ms']):.0f} | "
                     f"{float(r['load_1min']):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="rows per rank")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per mode and size")
    parser.add_argument("--quick", action="store_true", help="2 processes, tiny sizes")
    parser.add_argument("--csv", type=Path, help="write the rows to this CSV file")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args(argv)
    if args.quick:
        args.world, args.sizes, args.repeats = 2, [16, 32], 1
    env = harness.environment("cpu")
    env["threads"] = 1
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows = measure(args.world, args.sizes, args.repeats)
    if args.markdown:
        print(markdown_table(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*rows[0], *env])
            writer.writeheader()
            writer.writerows({**r, **env} for r in rows)
    return rows


if __name__ == "__main__":
    main()
