"""The measurement harness every benchmarks/<family>.py imports: a family declares its cases, the
harness times them in two patterns, counts their memory and writes the table, CSV and plot.

    from harness import Case, bench_main

    def cases(device, quick):
        yield Case("nt_xent 2N=16384 D=128", make_inputs, {"fastcl": nt_xent, "naive": formulas.nt_xent},
                   baseline="naive")

    if __name__ == "__main__":
        bench_main(__doc__.split("\\n")[0], cases, "fastcl contrastive losses")

Patterns, both measured for every case and implementation, the baseline in the same run, the
implementations interleaved round by round (one step of each per round, so a slow spell of a
shared machine hits them all):

* train, what a training loop does: each implementation gets a fresh state (case.make_inputs(), the
  tensors requiring grad made nn.Parameters held by an optimizer); a step is
  ``opt.zero_grad(set_to_none=True)``, the forward, ``loss.backward()`` (no optimizer update: it
  costs every implementation the same). ``train_cold_ms`` is the first step of that fresh state
  (first-touch page faults, lazy set-up, torch.compile's compilation), ``train_ms`` the median of
  the `repeats` steps after it, ``train_faults`` and ``train_sys_ms`` their median minor page
  faults and system CPU time (the kernel zeroing fresh pages shows there).
* call, one state shared by every implementation: a warm-up call, then the median of `repeats`
  calls of forward + backward with the gradients dropped after each (``call_ms``).

Speed-ups are taken per round (baseline time / implementation time in the same round); the rows
keep their median and their range over the rounds. Memory (``*_mib``) is the peak of what torch's
allocator hands out above what is allocated before: on CPU counted from the allocation events of
torch's profiler (``profile_memory=True``), on CUDA torch.cuda.max_memory_allocated; train counts
the first two steps of a fresh state (the gradients it keeps included), call one call after the
warm-up; outputs fastcl's C++ ops keep for reuse are dropped before each (empty_kept_outputs), so
they count. With ``compile`` each case also runs ``torch.compile`` of its baseline (inductor's
caches disabled, so that the cold step holds a first compilation).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

import fastcl

MiB = 2**20
COMPILED = " + torch.compile"


@dataclass
class Case:
    """One benchmark case: `make_inputs()` builds a fresh state (a list, the positional arguments
    of every implementation); `impls` maps a name to fn(*inputs), a loss to differentiate when
    `backward`, else a step run as is; speed-ups are against the implementation `baseline`.
    `compile` names the implementations also run under torch.compile (default: the baseline);
    a step calls an implementation `calls` times (for ops that take microseconds); `bytes_moved`
    (the bytes one step must move at least) adds the effective bandwidth `gb_per_s`."""

    name: str
    make_inputs: Callable[[], list]
    impls: dict
    baseline: str
    dtype: torch.dtype = torch.float32
    backward: bool = True
    compile: Optional[tuple] = None
    calls: int = 1
    bytes_moved: Optional[int] = None
    extra: dict = field(default_factory=dict)


# --- measurement -------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, device: str) -> tuple:
    """(seconds, minor page faults, system CPU seconds) of one step() (the device synchronized
    before and after; faults and system time are the whole process's)."""
    _sync(device)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    step()
    _sync(device)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (the profiler logs a line at each start and stop)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def empty_kept_outputs() -> None:
    """Drops the outputs fastcl's C++ ops keep to hand out again (csrc/kept_output.h), so that the
    next step allocates them afresh, as in a fresh process."""
    try:
        from fastcl import _C
    except ImportError:
        return
    if hasattr(_C, "empty_cache"):  # builds before it kept Sinkhorn's codes only
        _C.empty_cache()


def peak_allocated(step, device: str) -> int:
    """Peak bytes torch's allocator hands out during step() above what is allocated before it
    (fastcl's kept outputs dropped first, so that they count).

    CPU: the allocation and free events of torch's profiler, in time order (the allocator's own
    count, not the resident set size of the process, which also moves with pages the OS and
    malloc keep or return, code loaded on first use and other threads' work); a block allocated
    before the step counts neither while held nor when freed in it. CUDA: torch's allocator
    statistics."""
    empty_kept_outputs()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        step()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def train_state(make_inputs):
    """A fresh state as a training loop holds it: the inputs, those requiring grad as
    nn.Parameters, and an optimizer over them (None when there are none); no kept outputs."""
    empty_kept_outputs()
    torch.manual_seed(0)  # every implementation gets the same data
    inputs = [torch.nn.Parameter(x) if isinstance(x, torch.Tensor) and x.requires_grad else x
              for x in make_inputs()]
    params = [x for x in inputs if isinstance(x, torch.nn.Parameter)]
    return inputs, (torch.optim.SGD(params, lr=0.0) if params else None)


def train_step(fn, inputs, opt, backward: bool):
    """opt.zero_grad(set_to_none=True), then the forward and loss.backward()."""
    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        out = fn(*inputs)
        if backward:
            out.backward()
    return step


def call_step(fn, inputs, backward: bool):
    """fn(*inputs), its backward, then the gradients dropped."""
    def step():
        out = fn(*inputs)
        if backward:
            out.backward()
            for x in inputs:
                if isinstance(x, torch.Tensor):
                    x.grad = None
    return step


def interleaved(steps: dict, device: str, repeats: int) -> dict:
    """{impl: [timed() of each round]}: one step of every implementation per round."""
    times = {impl: [] for impl in steps}
    for _ in range(repeats):
        for impl, step in steps.items():
            times[impl].append(timed(step, device))
    return times


def _median(samples, i=0):
    return statistics.median(sample[i] for sample in samples)


def _speedups(times: dict, baseline: str) -> dict:
    """{impl: (median, min, max)} of the per-round ratios baseline / impl."""
    if baseline not in times:
        return {impl: (float("nan"),) * 3 for impl in times}
    out = {}
    for impl, ts in times.items():
        ratios = [b[0] / t[0] for b, t in zip(times[baseline], ts)]
        out[impl] = (statistics.median(ratios), min(ratios), max(ratios))
    return out


def _oom_guard(measure):
    try:
        return measure()
    except torch.OutOfMemoryError:
        return None


def measure_train(case: Case, impls: dict, device: str, repeats: int) -> dict:
    """{impl: {train_cold_ms, train_ms, train_speedup*, train_mib, train_faults, train_sys_ms}}
    in the training-loop pattern (faults and system time: medians per step after the first)."""
    steps, cold = {}, {}
    for impl, fn in impls.items():
        inputs, opt = train_state(case.make_inputs)
        steps[impl] = train_step(fn, inputs, opt, case.backward)
        cold[impl] = timed(steps[impl], device)
    times = interleaved(steps, device, repeats)
    del steps
    memory = {}
    for impl, fn in impls.items():
        inputs, opt = train_state(case.make_inputs)
        step = train_step(fn, inputs, opt, case.backward)
        memory[impl] = peak_allocated(lambda: (step(), step()), device)
        del inputs, opt, step
    speedups = _speedups(times, case.baseline)
    return {impl: {"train_cold_ms": cold[impl][0] * 1e3, "train_ms": _median(times[impl]) * 1e3,
                   "train_speedup": speedups[impl][0], "train_speedup_min": speedups[impl][1],
                   "train_speedup_max": speedups[impl][2], "train_mib": memory[impl] / MiB,
                   "train_faults": _median(times[impl], 1),
                   "train_sys_ms": _median(times[impl], 2) * 1e3}
            for impl in impls}


def measure_call(case: Case, impls: dict, device: str, repeats: int) -> dict:
    """{impl: {call_ms, call_speedup*, call_mib}}: calls on one shared state after a warm-up."""
    torch.manual_seed(0)
    inputs = case.make_inputs()
    steps = {impl: call_step(fn, inputs, case.backward) for impl, fn in impls.items()}
    for step in steps.values():
        step()  # warm-up
    times = interleaved(steps, device, repeats)
    memory = {impl: peak_allocated(step, device) for impl, step in steps.items()}
    speedups = _speedups(times, case.baseline)
    return {impl: {"call_ms": _median(times[impl]) * 1e3,
                   "call_speedup": speedups[impl][0], "call_speedup_min": speedups[impl][1],
                   "call_speedup_max": speedups[impl][2], "call_mib": memory[impl] / MiB}
            for impl in impls}


def implementations(case: Case, compile: bool) -> dict:
    """case.impls plus, with `compile`, torch.compile of those named in case.compile, each
    called case.calls times per step."""
    impls = dict(case.impls)
    if compile:
        names = case.compile if case.compile is not None else (case.baseline,)
        impls.update({f"{impl}{COMPILED}": torch.compile(case.impls[impl]) for impl in names})
    if case.calls == 1:
        return impls

    def repeated(fn):
        def steps(*inputs):
            for _ in range(case.calls):
                fn(*inputs)
        return steps
    return {impl: repeated(fn) for impl, fn in impls.items()}


def _warm_up_process(device: str) -> None:
    """Starts what every implementation shares (thread pool, autograd engine, fastcl's extension)
    so that it is not charged to the first cold step measured."""
    x = torch.randn(256, 256, device=device, requires_grad=True)
    (x @ x).sum().backward()
    fastcl.nt_xent(x[:8], x[8:16]).backward()


def measure_case(case: Case, device: str, repeats: int, compile: bool = True) -> list:
    """Table rows for one case: the training-loop pattern, then the call pattern (and the
    machine's load average when the case started: other work on a shared machine)."""
    load = round(os.getloadavg()[0], 2)
    if compile:
        torch._dynamo.reset()
        torch._inductor.config.force_disable_caches = True
    impls = implementations(case, compile)
    train = _oom_guard(lambda: measure_train(case, impls, device, repeats)) or {}
    call = _oom_guard(lambda: measure_call(case, impls, device, repeats)) or {}
    rows = []
    for impl in impls:
        row = {"case": case.name, "impl": impl, "dtype": str(case.dtype).replace("torch.", ""),
               "load_1min": load,
               "train_cold_ms": float("nan"), "train_ms": float("nan"),
               "train_speedup": float("nan"), "train_speedup_min": float("nan"),
               "train_speedup_max": float("nan"), "train_mib": float("nan"),
               "train_faults": float("nan"), "train_sys_ms": float("nan"),
               "call_ms": float("nan"), "call_speedup": float("nan"),
               "call_speedup_min": float("nan"), "call_speedup_max": float("nan"),
               "call_mib": float("nan"), "repeats": repeats}
        row.update(train.get(impl, {}))
        row.update(call.get(impl, {}))
        if case.bytes_moved is not None:
            row["gb_per_s"] = case.bytes_moved / row["train_ms"] / 1e6
        rows.append({**row, **case.extra})
    return rows


def run_cases(cases: Iterable[Case], device: str, repeats: int, only: str = "",
              compile: bool = True) -> list:
    """The rows of every case whose name contains `only`."""
    _warm_up_process(device)
    rows = []
    for case in cases:
        if only in case.name:
            case_rows = measure_case(case, device, repeats, compile)
            print_table(case_rows, header=not rows)
            rows += case_rows
    return rows


# --- output ------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    """Where and when: device, threads, OpenMP's wait policy (on a shared machine, threads that
    spin at a barrier wait for a descheduled peer), versions, commit (+: tracked files besides
    the results differ from it), date."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                      ":!/benchmarks/results"):
        commit += "+"  # changes besides the results
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {"device": f"{device}: {name}", "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "torch": torch.__version__, "fastcl": fastcl.__version__, "commit": commit,
            "date": datetime.date.today().isoformat()}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return platform.processor() or "cpu"


def _ratio(row, key) -> str:
    value = float(row[key])
    if value != value:  # NaN: no baseline
        return ""
    return f"{value:.2f}x ({float(row[key + '_min']):.2f}-{float(row[key + '_max']):.2f})"


def print_table(rows, header: bool = True) -> None:
    line = (f"{'case':44} {'impl':30} {'cold ms':>9} {'train ms':>9} {'train speed-up':>22} "
            f"{'MiB':>8} {'call ms':>9} {'call speed-up':>22} {'MiB':>8}")
    if header:
        print(line)
        print("-" * len(line))
    for r in rows:
        print(f"{r['case']:44} {r['impl']:30} {r['train_cold_ms']:9.1f} {r['train_ms']:9.1f} "
              f"{_ratio(r, 'train_speedup'):>22} {r['train_mib']:8.1f} {r['call_ms']:9.1f} "
              f"{_ratio(r, 'call_speedup'):>22} {r['call_mib']:8.1f}", flush=True)


def markdown_table(rows) -> str:
    """The rows (as measured, or as read back from a CSV) as a Markdown table."""
    lines = ["| case | implementation | train: cold ms | ms | speed-up (range) | MiB | "
             "call: ms | speed-up (range) | MiB | load |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ms = {k: f"{float(r[k]):.1f}" for k in ("train_cold_ms", "train_ms", "train_mib",
                                               "call_ms", "call_mib")}
        lines.append(f"| {r['case']} | {r['impl']} | {ms['train_cold_ms']} | {ms['train_ms']} | "
                     f"{_ratio(r, 'train_speedup')} | {ms['train_mib']} | {ms['call_ms']} | "
                     f"{_ratio(r, 'call_speedup')} | {ms['call_mib']} | {r['load_1min']} |")
    return "\n".join(lines)


def write_csv(rows, env, path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fields, *env])
        writer.writeheader()
        writer.writerows({**r, **env} for r in rows)


def append_csv(path: Path, row: dict) -> None:
    """Appends one row to a CSV, writing the header first when the file is new."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot(rows, env, path, title) -> None:
    """Bar chart: the training-loop step time and its peak memory, per case and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_names = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.7 * len(case_names) + 2.5))
    for ax, key, label in [(axes[0], "train_ms", "training step, steady (ms, log)"),
                           (axes[1], "train_mib", "peak allocated above inputs (MiB, log)")]:
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = {r["case"]: r[key] for r in rows if r["impl"] == impl}
            ys = [c for c in range(len(case_names)) if case_names[c] in values]
            ax.barh([y + i * width for y in ys], [max(values[case_names[y]], 1e-3) for y in ys],
                    width, label=impl)
        ax.set_yticks([y + 0.4 - width / 2 for y in range(len(case_names))], case_names)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}, {env['device']}, torch {env['torch']}, commit {env['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(description: str, default_repeats: int, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=default_repeats,
                        help="timed rounds per case and pattern")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also run torch.compile of each case's baseline (default: on)")
    parser.add_argument("--csv", type=Path, help="write the rows to this CSV file")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart to this file")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def bench_main(description: str, cases, title: str, default_repeats: int = 5, argv=None) -> list:
    """The command line every benchmark shares: cases(device, quick) yields its Cases."""
    args = parse_args(description, default_repeats, argv)
    env = environment(args.device)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows = run_cases(cases(args.device, args.quick), args.device, args.repeats, args.only,
                     args.compile)
    if args.markdown:
        print(markdown_table(rows))
    if args.csv and rows:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, env, args.csv)
    if args.plot and rows:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, env, args.plot, title)
    return rows
