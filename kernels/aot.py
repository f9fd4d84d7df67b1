"""Ahead-of-time compile of every launch configuration of fastcl's Triton kernels for real GPU
targets (sm_80, sm_90) on a machine without a GPU: Triton's own compiler and the ptxas its wheel
carries, through ``triton.compile(ASTSource(...), target=GPUTarget(...))``.

The configurations are not typed here. Each family's launchers are called on small CPU tensors
for every entry of the tables they pick their configurations from (``CONFIGS`` in each kernel
module: dtypes, row-width buckets, crop counts, flags), with the kernels swapped for recorders; a
recorded launch is compiled exactly as the launcher called it (argument types, constexprs,
``num_warps`` / ``num_stages``, each config of an autotuned kernel), specialized as Triton's JIT
specializes a real launch: 16-byte aligned tensors, sizes that are multiples of 16, unit strides
as the constant 1. A new table entry, flag or kernel is therefore compiled without touching this
file, and a ``*_kernel`` of a module that no launch reaches is reported.

Per compiled kernel it records what the driver would report after loading it (Triton's
``n_regs`` and ``n_spills`` come from CU_FUNC_ATTRIBUTE_NUM_REGS and LOCAL_SIZE_BYTES / 4, which
``cuobjdump -res-usage`` reads from the cubin: REG and LOCAL) and the shared memory per block
(Triton's dynamic allocation plus the static part), checked against the target's opt-in limit.

    python -m fastcl.kernels.aot [--family F ...] [--arch 80 90] [--jobs N] [--json PATH]
                                 [--markdown PATH]

Run it without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions): as a
script it clears the variable before triton is imported. tests/kernels/test_gpu_compile.py runs it
in a subprocess; docs/kernels.md holds its table (``--markdown``). Works with Triton 3.3 to 3.9
(the ``ASTSource`` signature is {name: type}, constexprs keyed by argument index tuples).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset

import torch  # noqa: E402
import triton  # noqa: E402

FAMILIES = ("contrastive", "bank", "dino", "dino_head", "koleo", "momentum", "siglip",
            "sinkhorn")
# Shared memory one block may use (opt-in maximum): A100 163 KiB, H100 / H200 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Launch:
    """One launch as a launcher makes it, reduced to what the compiler sees."""
    family: str
    kernel: str
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # "index" -> value (JSON keys: the argument's position)
    attrs: dict  # "index" -> [["tt.divisibility", 16]]
    options: dict  # num_warps, num_stages

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, self.constexprs, self.attrs,
                           self.options], sort_keys=True)

    def label(self) -> str:
        """Short description: pointer dtypes, constexprs by name, warps and stages."""
        names = list(self.signature)
        ptrs = sorted({t[1:] for t in self.signature.values() if t.startswith("*")}
                      - {"i64", "fp32"} or {"fp32"})
        consts = [f"{names[int(i)]}={v}" for i, v in sorted(self.constexprs.items(),
                                                            key=lambda kv: int(kv[0]))
                  if self.signature[names[int(i)]] == "constexpr" and names[int(i)].isupper()]
        opts = f"w{self.options.get('num_warps', 4)}s{self.options.get('num_stages', 3)}"
        return " ".join(["/".join(ptrs)] + consts + [opts])


# ----------------------------------------------------------------------------------------------
# Recording the launches
# ----------------------------------------------------------------------------------------------
def _specialize(value, specialize: bool):
    """(Triton type, specialization key) of an argument value, as the JIT computes it: key "D" for
    16-divisible values and 16-aligned pointers, a constant for the integer 1."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        return native_specialize_impl(CUDABackend, value, False, specialize, True)
    except ImportError:  # older Triton: the same rules, spelled out
        pass
    if isinstance(value, torch.Tensor):
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                torch.uint8: "u8", torch.bool: "i1"}[value.dtype]
        return "*" + name, "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, "D" if specialize and value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"cannot type a kernel argument of type {type(value).__name__}")


def _jit_function(kernel):
    """The JITFunction under autotune / heuristics wrappers."""
    while not hasattr(kernel, "params"):
        kernel = kernel.fn
    return kernel


def _launches_of(family: str, kernel_name: str, kernel, args, kwargs) -> list[Launch]:
    """The compiled variants of one recorded call: one per autotune config."""
    fn = _jit_function(kernel)
    names = [p.name for p in fn.params]
    configs = getattr(kernel, "configs", None) or [None]
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:  # the candidates autotune would time for this launch
        configs = prune(configs, dict(zip(names, args)), **kwargs)
    out = []
    for config in configs:
        call = dict(kwargs)
        if config is not None:
            call.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        values = dict(zip(names, args))
        values.update({k: v for k, v in call.items() if k in names})
        options = {k: v for k, v in call.items() if k not in names}
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            value = values.get(p.name, p.default)
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[str(i)] = value
                continue
            ty, key = _specialize(value, not p.do_not_specialize)
            signature[p.name] = ty
            if ty == "constexpr":
                constexprs[str(i)] = key
            elif isinstance(key, str) and "D" in key:
                attrs[str(i)] = [["tt.divisibility", 16]]
        out.append(Launch(family, kernel_name, signature, constexprs, attrs, options))
    return out


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, family, name, kernel, sink):
        self.family, self.name, self.kernel, self.sink = family, name, kernel, sink

    @property
    def fn(self):
        """The kernel under its autotune wrapper, launched with explicit tiles."""
        return _Recorder(self.family, self.name, _jit_function(self.kernel), self.sink)

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.extend(_launches_of(self.family, self.name, self.kernel, args, kwargs))
        return record


def kernel_names(module) -> list[str]:
    """The module's launchable kernels: its triton.jit (or autotuned) functions named *_kernel."""
    return sorted(n for n, v in vars(module).items()
                  if n.endswith("_kernel") and hasattr(v, "run"))


def record(family: str) -> list[Launch]:
    """Every distinct launch the family's launchers make over their configuration tables."""
    module = importlib.import_module(f"fastcl.kernels.{family}")
    sink: list[Launch] = []
    originals = {n: getattr(module, n) for n in kernel_names(module)}
    try:
        for n, k in originals.items():
            setattr(module, n, _Recorder(family, n, k, sink))
        SWEEPS[family](module)
    finally:
        for n, k in originals.items():
            setattr(module, n, k)
    unique = {}
    for launch in sink:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# ----------------------------------------------------------------------------------------------
# The sweeps: each launcher over its module's CONFIGS. Sizes are multiples of 16 and tensors
# contiguous, as in training, so the variant compiled is the one real launches use.
# ----------------------------------------------------------------------------------------------
def _rows(n, d, dtype):
    return torch.randn(n, d).to(dtype)


def _operand_kinds(dtypes):
    """Yields each of dtypes with TF32 off, then float32 with TF32 on: fp32 operands compile as
    exact fp32 ("ieee"), or as tf32 where torch.backends.cuda.matmul.allow_tf32 is set."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for dtype, tf32 in [(t, False) for t in dtypes] + [(torch.float32, True)]:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            yield dtype
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def _sweep_contrastive(k):
    scale = torch.tensor(10.0)
    for dtype in _operand_kinds(k.CONFIGS["dtypes"]):
        for d in k.CONFIGS["dims"]:
            a, b = _rows(32, d, dtype), _rows(48, d, dtype)
            la, lb = torch.arange(32), torch.arange(48)
            for symmetric in (False, True):
                k.gram_stats_fwd(a, la, scale, symmetric=symmetric)
            k.gram_stats_bwd(a, la, scale, torch.rand(5, 32))
            k.bank_lse_fwd(a, b, scale)
            for has_diag in (False, True):
                for with_col in (False, True):
                    k.cross_stats_fwd(a, b, la, lb, scale, 0, has_diag, with_col)
                    for need_dk in (False, True):
                        col = torch.rand(5, 48 if with_col else 0)
                        k.cross_stats_bwd(a, b, la, lb, scale, 0, has_diag, torch.rand(5, 32),
                                          col, need_dk)


def _sweep_bank(k):
    scale, shift = torch.tensor(10.0), torch.tensor(1.0)
    for bank_dtype in k.CONFIGS["dtypes"]:
        queue = torch.zeros(64, 128, dtype=bank_dtype)
        k.ring_enqueue(queue, torch.tensor(0), torch.tensor(0), _rows(32, 128, bank_dtype))
        for dtype in k.CONFIGS["dtypes"]:  # the features' dtype
            for d in k.CONFIGS["dims"]:
                bank, f = _rows(64, d, bank_dtype), _rows(32, d, dtype)
                idx = torch.randint(0, 64, (32, 16))
                k.bank_update(bank, idx[:, 0], f, torch.ones(32, dtype=torch.bool), 0.5)
                k.sampled_lse_fwd(f, bank, idx, scale, shift)
                g = torch.rand(32)
                k.sampled_lse_bwd(f, bank, idx, scale, shift, g, g, g, g)


def _sweep_dino(k):
    scale = torch.tensor(10.0)
    crops = [(s, t) for s in k.CONFIGS["student_crops"] for t in k.CONFIGS["teacher_crops"]
             if t <= s]
    for dtype in k.CONFIGS["dtypes"]:
        for s, t in crops:
            student, teacher = torch.randn(s, 16, 256).to(dtype), torch.randn(t, 16, 256).to(dtype)
            center = torch.zeros(256)
            _, ss, ts = k.dino_cross_entropy_fwd(student, teacher, center, scale, scale)
            k.dino_cross_entropy_bwd(student, teacher, center, scale, scale, ss, ts,
                                     torch.tensor(1.0))


def _sweep_dino_head(k):
    scale, s, t, b = torch.tensor(10.0), 4, 2, 16
    for dtype in _operand_kinds(k.CONFIGS["dtypes"]):
        for h in k.CONFIGS["dims"]:
            student, teacher = torch.randn(s, b, h).to(dtype), torch.randn(t, b, h).to(dtype)
            weights = torch.randn(2, 256, h).to(dtype)
            args = (student, teacher, *weights, torch.zeros(256), scale, scale, torch.ones(b))
            for diagonal in (False, True):
                _, ss, ts = k.dino_head_fwd(*args, diagonal)
                k.dino_head_bwd(*args, diagonal, ss, ts, torch.tensor(1.0))


def _sweep_koleo(k):
    neighbour = (torch.arange(48) + 1) % 48  # the recorded forward computes none
    for dtype in k.CONFIGS["dtypes"]:
        k.koleo_fwd(_rows(48, 128, dtype), 1e-8)
        for d in k.CONFIGS["dims"]:
            k.koleo_bwd(_rows(48, d, dtype), neighbour, torch.tensor(1.0), 1e-8)


def _sweep_momentum(k):
    momentum = torch.tensor(0.99, dtype=torch.float64)
    for t_dtype in k.CONFIGS["dtypes"]:
        for o_dtype in k.CONFIGS["dtypes"]:
            for aligned in (True, False):
                size = 64 if aligned else 40  # a second tensor at offset 40: not 16-aligned
                t, o = torch.zeros(2 * size, dtype=t_dtype), torch.zeros(2 * size, dtype=o_dtype)
                k.momentum_update_([t[:size], t[size:]], [o[:size], o[size:]], momentum)


def _sweep_siglip(k):
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    for dtype in _operand_kinds(k.CONFIGS["dtypes"]):
        for d in k.CONFIGS["dims"]:
            x, y = _rows(32, d, dtype), _rows(48, d, dtype)
            for norms in ({}, dict(inv_x=torch.rand(32), inv_y=torch.rand(48))):
                k.sigmoid_pairs_fwd(x, y, scale, bias, 0, **norms)
                k.sigmoid_pairs_bwd(x, y, scale, bias, 0, torch.rand(32), **norms)


def _sweep_sinkhorn(k):
    for dtype in k.CONFIGS["dtypes"]:
        scores = torch.randn(64, 48).to(dtype)
        col_max, _ = k.sinkhorn_init_fwd(scores, 20.0)
        k.sinkhorn_step_fwd(scores, 20.0, col_max, torch.zeros(48))
        k.sinkhorn_codes_fwd(scores, 20.0, col_max, torch.zeros(48))


SWEEPS = dict(contrastive=_sweep_contrastive, bank=_sweep_bank, dino=_sweep_dino,
              dino_head=_sweep_dino_head,
              koleo=_sweep_koleo, momentum=_sweep_momentum, siglip=_sweep_siglip,
              sinkhorn=_sweep_sinkhorn)


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------
@dataclass
class Result:
    family: str
    kernel: str
    config: str
    arch: int
    ok: bool = False
    error: str = ""
    regs: int = 0
    spill_bytes: int = 0  # Triton's n_spills * 4
    smem: int = 0  # bytes per block, dynamic + static
    smem_limit: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's and ptxas's: the time on an idle core
    extra: dict = field(default_factory=dict)


def _resource_usage(cubin: bytes, name: str) -> dict:
    """REG, LOCAL and SHARED of a kernel, as ``cuobjdump -res-usage`` reads them from the cubin."""
    try:
        tool = triton.knobs.nvidia.cuobjdump.path
    except AttributeError:
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = text.split(f"Function {name}:", 1)[1]
    return {k: int(v) for k, v in re.findall(r"(REG|LOCAL|SHARED|STACK):(\d+)", usage)}


def compile_launch(launch: Launch, arch: int) -> Result:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(launch.family, launch.kernel, launch.label(), arch,
                    smem_limit=SMEM_LIMIT[arch])
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        module = importlib.import_module(f"fastcl.kernels.{launch.family}")
        fn = _jit_function(getattr(module, launch.kernel))
        src = ASTSource(fn, launch.signature,
                        constexprs={(int(i),): v for i, v in launch.constexprs.items()},
                        attrs={(int(i),): v for i, v in launch.attrs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(launch.options))
        usage = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
        result.regs, result.spill_bytes = usage["REG"], usage["LOCAL"]
        result.smem = compiled.metadata.shared + usage.get("SHARED", 0)
        result.extra = dict(stack=usage.get("STACK", 0), dynamic_smem=compiled.metadata.shared)
        result.ok = True
    except Exception as e:  # recorded: the caller decides
        result.error = f"{type(e).__name__}: {e}"[-4000:]
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = _cpu_seconds() - cpu_start
    return result


def _cpu_seconds() -> float:
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _compile_star(job):
    return compile_launch(*job)


def compile_all(families=FAMILIES, archs=(80, 90), jobs=1) -> tuple[list[Result], dict]:
    """(results of every launch of every family for every arch, {family: kernels no launch
    reached})."""
    jobs_list, missed = [], {}
    for family in families:
        launches = record(family)
        module = importlib.import_module(f"fastcl.kernels.{family}")
        missed[family] = sorted(set(kernel_names(module)) - {l.kernel for l in launches})
        jobs_list += [(launch, arch) for launch in launches for arch in archs]
    if jobs <= 1:
        return [compile_launch(*job) for job in jobs_list], missed
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_star, jobs_list, chunksize=4)), missed


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def markdown(results: list[Result]) -> str:
    """Per kernel and target: configurations, max registers, max shared memory, spills."""
    rows = {}
    for r in results:
        rows.setdefault((r.family, r.kernel), {}).setdefault(r.arch, []).append(r)
    archs = sorted({r.arch for r in results})
    head = "| family | kernel | configs | " + " | ".join(
        f"sm_{a} regs (max) | sm_{a} smem KiB (max) | sm_{a} spills" for a in archs) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * len(archs))]
    for (family, kernel), by_arch in sorted(rows.items()):
        cells = [family, f"`{kernel}`", str(len(next(iter(by_arch.values()))))]
        for a in archs:
            rs = [r for r in by_arch.get(a, []) if r.ok]
            bad = len(by_arch.get(a, [])) - len(rs)
            spilled = [r for r in rs if r.spill_bytes]
            cells += [str(max((r.regs for r in rs), default=0)),
                      f"{max((r.smem for r in rs), default=0) / 1024:.1f}",
                      (f"{len(spilled)} cfg, max {max(r.spill_bytes for r in spilled)} B"
                       if spilled else "0") + (f" ({bad} failed)" if bad else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_markdown(path: str, table: str) -> None:
    """Replaces the text between the aot-table markers of path (or writes the table alone)."""
    start, end = "<!-- aot-table:start -->\n", "<!-- aot-table:end -->"
    text = open(path).read() if os.path.exists(path) else start + end + "\n"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start.strip()} / {end} markers")
    head, rest = text.split(start, 1)
    open(path, "w").write(head + start + table + end + rest.split(end, 1)[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--arch", nargs="*", type=int, default=[80, 90], choices=sorted(SMEM_LIMIT))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", help="write every result (and the kernels no launch reached) here")
    p.add_argument("--markdown", help="update the table between the aot-table markers of this file")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot: TRITON_INTERPRET is set: the kernels are interpreted, not compiled")
    start = time.perf_counter()
    results, missed = compile_all(args.family, args.arch, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=[asdict(r) for r in results], missed=missed,
                           triton=triton.__version__, torch=torch.__version__), f, indent=1)
    table = markdown(results)
    if args.markdown:
        _write_markdown(args.markdown, table)
    print(table)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED sm_{r.arch} {r.kernel} [{r.config}]: {r.error.splitlines()[0]}")
    print(f"{len(results)} compiles, {len(failed)} failed, "
          f"{sum(1 for r in results if r.spill_bytes)} with spills, "
          f"{time.perf_counter() - start:.0f} s (triton {triton.__version__})")
    return 1 if failed or any(missed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
