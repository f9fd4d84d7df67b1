"""One prepared command for a GPU lease: correctness at real sizes against float64, the chip's two
ceilings, benchmarks against the baselines, and a short training run, in one process.

    python benchmarks/gpu.py --out DIR            # a CUDA machine: under 8 minutes on an H100/H200
    python benchmarks/gpu.py --smoke --out DIR    # the same code on tiny shapes, on CPU, with the
                                                  # Triton kernels under TRITON_INTERPRET=1 (CI)

Sections, in this order (each case is wrapped: a failure is recorded and the script goes on; past
--budget seconds the remaining cases are recorded as skipped, so the results come back within a
lease):
  1. ceilings: device-to-device copy bandwidth and the bf16 matmul rate (8192^3);
  2. correctness: each op at real sizes against a float64 reference computed from the same
     (rounded) inputs, outputs and input gradients under a random upstream gradient, in fp32,
     bf16 and fp16; where the reference would not fit, the upstream gradient is nonzero on a block
     of rows only, so the reference needs those rows' logits alone and still gives the gradient of
     every input exactly. Free device memory is filled with NaN before each run, so an output
     element a kernel forgets to write shows up;
  3. a short trainer run (``fastcl train simclr`` on the embedded digits, bf16);
  4. training steps (train_step): each method's whole step of benchmarks/train_step.py (augment,
     forward, loss, backward, optimizer, momentum / queue / bank updates) under bf16 autocast with
     channels-last weights and views, on ResNet-50 (ImageNet stem) at batch 256 and ViT-S/16, 224
     px, the papers' ImageNet heads, fastcl's fused ops against the naive formulas on copies of
     the same model and batch: images/s, speed-up, peak memory. ResNet-50 SimCLR, MoCo v3 and DINO
     come first, then ViT-S/16 MoCo v3 and DINO, then the other methods; the section takes at
     most 150 s of the budget, and a case whose warm-up steps say it would not fit is skipped;
  5. benchmarks: fastcl against the naive formula, torch.compile of it and the peers that import
     here (open_clip's ClipLoss, Inf-CL's inf_cl, torch._foreach_lerp_), median time from
     triton.testing.do_bench, peak memory above the inputs (torch.cuda.max_memory_allocated).
     ``tflops`` counts the naive formula's FLOPs for every implementation alike (NT-Xent forward +
     backward: 6 (2N)^2 D), so the column compares times; ``gbps`` counts the bytes the op must
     move (its inputs read once, its outputs and gradients written once).

Writes DIR/gpu_<device>.csv with the columns of FIELDS (status: ok, FAIL, error or skipped;
detail: the errors measured or the exception; images_s and speedup: the training steps'),
DIR/gpu_<device>.png when matplotlib imports, and prints a short table last. Installs nothing;
every optional import is guarded.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:  # must be set before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FASTCL_CPU_BACKEND"] = "triton"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastcl  # noqa: E402
from fastcl import formulas  # noqa: E402
from fastcl.models import Bottleneck, ResNet, ViT  # noqa: E402
from fastcl.ops.contrastive import cross_contrastive_ref  # noqa: E402
from fastcl.ops.momentum import momentum_update_ref  # noqa: E402
from fastcl.ops.sinkhorn import sinkhorn_log_ref  # noqa: E402
from dino_head import (  # noqa: E402 (benchmarks/dino_head.py: the same three implementations)
    _head_inputs, _ibot, dino_fused, dino_head_then_fastcl, dino_head_then_formula)

import train_step  # noqa: E402  (benchmarks/, this script's folder)

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["case", "impl", "dtype", "ms", "peak_mib", "tflops", "gbps", "images_s", "speedup",
          "matmul_tflops", "copy_gbps", "device", "torch", "triton", "commit", "status", "detail"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max error relative to the reference's largest magnitude. Inputs are rounded to the dtype before
# the float64 reference sees them: only accumulation and the final rounding differ.
TOL = {"fp32": 1e-4, "bf16": 1.6e-2, "fp16": 2e-3}
MiB = 2**20

# Real sizes (a CUDA device) and tiny ones (--smoke). Row counts are 2N for NT-Xent.
SIZES = {
    "full": dict(ntx_rows=65536, ntx_dims=(128, 256, 1024), ntx_bench=((16384, 128), (65536, 128),
                 (65536, 256)), check_rows=256, queue=(256, 65536, 128), clip=(32768, 256),
                 supcon=(16384, 128), siglip_check=(4096, 256), siglip=(16384, 256),
                 dino=(12, 2, 32, 65536), dino_bench=(12, 2, 64, 65536),
                 dino_head=(10, 2, 64, 256, 65536), ibot_tokens=3763,
                 sinkhorn=(4096, 3000), bank=(256, 4096, 128, 100_000), copy_mib=1024,
                 matmul=8192, train=["--epochs", "3", "--batch-size", "256"],
                 train_step=dict(side=224, batch=256, width=1.0, layers=(3, 4, 6, 3),
                                 num_items=1_281_167,
                                 vit=dict(dim=384, depth=12, heads=6, patch_size=16),
                                 hparams="imagenet", every_method_on=("resnet50", "vit_s16"),
                                 warmup=2, rounds=3, seconds=150)),
    "smoke": dict(ntx_rows=96, ntx_dims=(16, 40), ntx_bench=((64, 16),), check_rows=8,
                  queue=(8, 96, 16), clip=(48, 16), supcon=(48, 16), siglip_check=(40, 16),
                  siglip=(48, 16), dino=(3, 2, 4, 80),
                  dino_bench=(3, 2, 4, 80), dino_head=(3, 2, 5, 24, 70), ibot_tokens=20,
                  sinkhorn=(24, 40), bank=(8, 12, 16, 64), copy_mib=1,
                  matmul=64, train=["--epochs", "1", "--batch-size", "8", "--width", "0.125",
                                    "--proj-hidden", "32"],
                  train_step=dict(side=32, batch=8, width=0.125, layers=(1, 1, 1, 1), num_items=64,
                                  vit=dict(dim=24, depth=1, heads=2, patch_size=8),
                                  hparams="smoke", every_method_on=("resnet50",), warmup=1,
                                  rounds=1, seconds=math.inf)),
}


# ----------------------------------------------------------------------------------------------
# Run state, measurement
# ----------------------------------------------------------------------------------------------
class Run:
    """Rows of the CSV (written after every case, so a killed run keeps what it measured), the
    device, the ceilings and the time budget."""

    def __init__(self, out: Path, smoke: bool, budget: float, compile_baselines: bool):
        self.out, self.smoke, self.budget = out, smoke, budget
        self.compile_baselines = compile_baselines
        self.size = SIZES["smoke" if smoke else "full"]
        self.device = "cpu" if smoke else "cuda"
        # The Triton interpreter has no bfloat16 dot: smoke runs put fp16 where bf16 would go in
        # the kernels built on tl.dot (contrastive), so the same code runs.
        self.half = "fp16" if smoke else "bf16"
        self.dot_dtypes = ["fp32", "fp16"] if smoke else list(DTYPES)
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.ceilings = dict(matmul_tflops=None, copy_gbps=None)
        name = "cpu" if smoke else torch.cuda.get_device_name().replace(" ", "_")
        self.csv = out / f"gpu_{name}.csv"
        self.meta = dict(device=name, torch=torch.__version__, triton=_version("triton"),
                         commit=_commit())

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def add(self, case, impl, dtype="", status="ok", detail="", **numbers):
        row = dict(case=case, impl=impl, dtype=dtype, status=status, detail=detail, **self.meta,
                   **{k: v for k, v in self.ceilings.items() if v is not None})
        row.update({k: _fmt(v) for k, v in numbers.items()})
        self.rows.append(row)
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)

    def guarded(self, case, impl, dtype, fn):
        """fn() -> None, recording an exception (or the budget running out) as a row."""
        if self.left() <= 0:
            self.add(case, impl, dtype, status="skipped", detail="time budget spent")
            return
        try:
            fn()
        except Exception as e:  # recorded; the run goes on
            detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            self.add(case, impl, dtype, status="error", detail=detail)
            traceback.print_exc()
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()


def _fmt(v):
    return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "none"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(step, device: str) -> float:
    """Median milliseconds of step(): do_bench (L2 flushed) on CUDA; elsewhere (smoke) one timed
    call, after the caller's warm-up."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(step, warmup=10, rep=60, return_mode="median")
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def peak_mib(step, device: str) -> float | None:
    """MiB that one step() allocates above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MiB


def poison(device: str) -> None:
    """Fills most free device memory with NaN and frees it: the caching allocator hands the same
    memory to the next torch.empty, so an unwritten output element reads NaN."""
    if device != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    n = int(free * 0.6) // 4
    if n > 0:
        torch.empty(n, dtype=torch.float32, device=device).fill_(float("nan"))


# ----------------------------------------------------------------------------------------------
# 1. Ceilings
# ----------------------------------------------------------------------------------------------
def ceilings(run: Run) -> None:
    dev = run.device

    def copy():
        x = torch.empty(run.size["copy_mib"] * MiB, dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        ms = median_ms(lambda: y.copy_(x), dev)
        run.ceilings["copy_gbps"] = 2 * x.numel() / ms / 1e6  # read + written
        run.add("ceiling copy", "torch", "u8", ms=ms, gbps=run.ceilings["copy_gbps"])

    def matmul():
        n = run.size["matmul"]
        a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
        ms = median_ms(lambda: a @ b, dev)
        run.ceilings["matmul_tflops"] = 2 * n**3 / ms / 1e9
        run.add(f"ceiling matmul {n}^3", "torch", "bf16", ms=ms,
                tflops=run.ceilings["matmul_tflops"])

    run.guarded("ceiling copy", "torch", "u8", copy)
    run.guarded("ceiling matmul", "torch", "bf16", matmul)


# ----------------------------------------------------------------------------------------------
# 2. Correctness against float64
# ----------------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (NaN anywhere in a gives NaN)."""
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def leaves(xs, dtype, device):
    """The inputs rounded to dtype on device, and the same values in float64, all requiring
    grad: the reference sees exactly what the kernels see."""
    low = [x.to(device=device, dtype=dtype).requires_grad_() for x in xs]
    return low, [x.detach().double().requires_grad_() for x in low]


def compare(run, case, dtype, fused, reference, inputs, upstream):
    """Runs fused(*low) and reference(*high) -> outputs, backpropagates the upstream gradients
    (one per output; none where the outputs have no gradient) and records the worst error of
    outputs and input gradients against the dtype's tolerance."""
    low, high = leaves(inputs, DTYPES[dtype], run.device)
    poison(run.device)
    outs = fused(*low)
    ref = reference(*high)
    if any(o.requires_grad for o in outs):
        torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, upstream)])
        torch.autograd.backward(ref, [g.double() for g in upstream])
    sync(run.device)
    errs = [rel_err(o, r) for o, r in zip(outs, ref)]
    errs += [rel_err(x.grad, h.grad) for x, h in zip(low, high) if h.grad is not None]
    worst = max(errs, key=lambda e: math.inf if math.isnan(e) else e)
    ok = worst <= TOL[dtype]
    run.add(case, "check vs float64", dtype, status="ok" if ok else "FAIL",
            detail=f"max rel err {worst:.2e} (outputs {', '.join(f'{e:.1e}' for e in errs)}; "
                   f"tol {TOL[dtype]:.0e})")


def _row_block(run, rows):
    """A block of check_rows rows [r0, r1) near the middle, and a random upstream on it."""
    r0 = rows // 2 - run.size["check_rows"] // 2
    return r0, r0 + run.size["check_rows"]


def check_contrastive(run: Run) -> None:
    s, dev = run.size, run.device
    m = s["ntx_rows"]
    for d in s["ntx_dims"]:
        for dtype in run.dot_dtypes:
            z1, z2 = torch.randn(m // 2, d), torch.randn(m // 2, d)
            r0, r1 = _row_block(run, m)
            g = torch.randn(r1 - r0, device=dev)
            labels = torch.arange(m, device=dev) % (m // 2)

            def fused(z1, z2):
                return (fastcl.nt_xent(z1, z2, 0.1, reduction="none")[r0:r1],)

            def reference(z1, z2):  # rows r0..r1 of the Gram matrix, self-pairs at j - i = r0
                u = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
                scale = torch.tensor(10.0, dtype=u.dtype, device=dev)
                return (cross_contrastive_ref(u[r0:r1], u, labels[r0:r1], labels, scale, r0,
                                              False)[0],)

            run.guarded(f"nt_xent 2N={m} D={d}", "check", dtype,
                        lambda: compare(run, f"nt_xent 2N={m} D={d}", dtype, fused, reference,
                                        [z1, z2], [g]))

    b, k, d = s["queue"]
    for dtype in run.dot_dtypes:
        q, key, queue = torch.randn(b, d), torch.randn(b, d), F.normalize(torch.randn(k, d), dim=1)
        g = torch.randn(b, device=dev)
        queue_dev = queue.to(dev, DTYPES[dtype])

        def fused(q, key):
            return (fastcl.info_nce(q, key, queue_dev, 0.07, reduction="none"),)

        def reference(q, key):
            return (formulas.info_nce(q, key, queue_dev.double(), 0.07, reduction="none"),)

        run.guarded(f"info_nce queue K={k}", "check", dtype,
                    lambda: compare(run, f"info_nce queue K={k}", dtype, fused, reference,
                                    [q, key], [g]))

    n, d = s["clip"]
    r0, r1 = _row_block(run, n)
    for dtype in (run.half,):
        g = torch.randn(r1 - r0, device=dev)
        ids = torch.arange(n, device=dev)

        def fused(q, key):
            return (fastcl.info_nce(q, key, None, 0.07, symmetric=True,
                                    reduction="none")[r0:r1],)

        def reference(q, key):  # CLIP: (row loss + column loss) / 2 of samples r0..r1
            q, key = F.normalize(q, dim=1), F.normalize(key, dim=1)
            scale = torch.tensor(1 / 0.07, dtype=q.dtype, device=dev)
            row = cross_contrastive_ref(q[r0:r1], key, ids[r0:r1], ids, scale, None, False)[0]
            col = cross_contrastive_ref(key[r0:r1], q, ids[r0:r1], ids, scale, None, False)[0]
            return (0.5 * (row + col),)

        run.guarded(f"clip N={n} D={d}", "check", dtype,
                    lambda: compare(run, f"clip N={n} D={d}", dtype, fused, reference,
                                    [torch.randn(n, d), torch.randn(n, d)], [g]))

    n, d = s["supcon"]
    r0, r1 = _row_block(run, n)
    labels = torch.randint(0, max(2, n // 8), (n,), device=dev)
    g = torch.randn(r1 - r0, device=dev)

    def fused(x):
        return (fastcl.supcon(x, labels, 0.1, reduction="none")[r0:r1],)

    def reference(x):
        u = F.normalize(x, dim=1)
        scale = torch.tensor(10.0, dtype=u.dtype, device=dev)
        return (cross_contrastive_ref(u[r0:r1], u, labels[r0:r1], labels, scale, r0, False)[0],)

    run.guarded(f"supcon M={n}", "check", run.half,
                lambda: compare(run, f"supcon M={n}", run.half, fused, reference,
                                [torch.randn(n, d)], [g]))


def check_others(run: Run) -> None:
    s, dev = run.size, run.device
    crops, t_crops, b, k = s["dino"]
    center = (0.1 * torch.randn(k)).to(dev)
    for dtype in DTYPES:
        def fused(student, teacher):
            return (fastcl.dino_loss(student, teacher.detach(), center, 0.1, 0.04),)

        def reference(student, teacher):
            return (formulas.dino_loss(student, teacher.detach(), center.double(), 0.1, 0.04),)

        run.guarded(f"dino S={crops} B={b} K={k}", "check", dtype,
                    lambda: compare(run, f"dino S={crops} B={b} K={k}", dtype, fused, reference,
                                    [3 * torch.randn(crops, b, k), 3 * torch.randn(t_crops, b, k)],
                                    [torch.tensor(1.0, device=dev)]))

    crops, t_crops, b, h, k = s["dino_head"]
    head_center = (0.1 * torch.randn(k)).to(dev)
    for dtype in run.dot_dtypes:
        def fused(student, teacher, w_student, w_teacher):
            return (fastcl.dino_head_loss(student, teacher, w_student, w_teacher, head_center, 0.1,
                                          0.04),)

        def reference(student, teacher, w_student, w_teacher):
            return (formulas.dino_loss(student @ w_student.T, (teacher @ w_teacher.T).detach(),
                                       head_center.double(), 0.1, 0.04),)

        case = f"dino_head S={crops} B={b} H={h} K={k}"
        run.guarded(case, "check", dtype,
                    lambda: compare(run, case, dtype, fused, reference,
                                    [F.normalize(torch.randn(n, b, h), dim=-1)
                                     for n in (crops, t_crops)]
                                    + [5 * F.normalize(torch.randn(k, h), dim=-1)
                                       for _ in range(2)],
                                    [torch.tensor(1.0, device=dev)]))

    n, d = s["siglip_check"]
    for dtype in run.dot_dtypes:
        def fused(image, text, scale, bias):
            return (fastcl.siglip(image, text, scale, bias),)

        def reference(image, text, scale, bias):
            return (formulas.siglip(image, text, scale, bias),)

        run.guarded(f"siglip N={n} D={d}", "check", dtype,
                    lambda: compare(run, f"siglip N={n} D={d}", dtype, fused, reference,
                                    [torch.randn(n, d), torch.randn(n, d), torch.tensor(10.0),
                                     torch.tensor(-10.0)], [torch.tensor(1.0, device=dev)]))

    rows, cols = s["sinkhorn"]
    for dtype in DTYPES:
        def sk(scores):  # codes get no gradient
            return (fastcl.sinkhorn(scores.detach(), 0.05, 3),)

        def sk_ref(scores):
            return (sinkhorn_log_ref(scores.detach(), 0.05, 3),)

        run.guarded(f"sinkhorn {rows}x{cols}", "check", dtype,
                    lambda: compare(run, f"sinkhorn {rows}x{cols}", dtype, sk, sk_ref,
                                    [F.normalize(torch.randn(rows, cols), dim=1)], [None]))

    for t_dtype, o_dtype in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
        run.guarded("momentum resnet50", "check", f"{t_dtype}<-{o_dtype}",
                    lambda: check_momentum(run, t_dtype, o_dtype))
    run.guarded("bank", "check", "fp32", lambda: check_bank(run))


def resnet50_shapes(scale: int = 1) -> list[tuple]:
    """The parameter shapes of torchvision's ResNet-50 (161 tensors, 25.6 M parameters); scale
    divides the channel counts (smoke)."""
    c = lambda n: max(1, n // scale)  # noqa: E731
    shapes = [(c(64), 3, 7, 7), (c(64),), (c(64),)]
    inplanes = c(64)
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        p, out = c(planes), c(planes * 4)
        for i in range(blocks):
            shapes += [(p, inplanes, 1, 1), (p,), (p,), (p, p, 3, 3), (p,), (p,), (out, p, 1, 1),
                       (out,), (out,)]
            if i == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    return shapes + [(c(1000), inplanes), (c(1000),)]


def check_momentum(run: Run, t_dtype: str, o_dtype: str) -> None:
    shapes = resnet50_shapes(16 if run.smoke else 1)
    target = [torch.randn(s, device=run.device, dtype=DTYPES[t_dtype]) for s in shapes]
    online = [torch.randn(s, device=run.device, dtype=DTYPES[o_dtype]) for s in shapes]
    expected = [t.double() for t in target]
    momentum_update_ref(expected, [o.double() for o in online],
                        torch.tensor(0.996, dtype=torch.float64, device=run.device))
    fastcl.momentum_update(target, online, 0.996)
    err = max(rel_err(t, e) for t, e in zip(target, expected))
    tol = TOL[t_dtype]
    run.add("momentum resnet50", "check vs float64", f"{t_dtype}<-{o_dtype}",
            status="ok" if err <= tol else "FAIL", detail=f"max rel err {err:.2e} (tol {tol:.0e})")


def check_bank(run: Run) -> None:
    b, k, d, n = run.size["bank"]
    dev = run.device
    queue = fastcl.Queue(n, d, device=dev)
    keys = F.normalize(torch.randn(b, d, device=dev), dim=1)
    queue.enqueue(keys)
    queue.enqueue(keys)
    ok = torch.equal(queue.tensor[b:2 * b], keys) and int(queue.pointer) == 2 * b % n
    run.add("queue enqueue", "check exact", "fp32", status="ok" if ok else "FAIL")
    bank = fastcl.MemoryBank(n, d, device=dev)
    idx = torch.randint(0, n, (b, k + 1), device=dev)
    f = torch.randn(b, d)
    g = torch.randn(b, device=dev)
    compare(run, f"sampled_info_nce B={b} K={k}", "fp32",
            lambda x: (fastcl.sampled_info_nce(x, bank.tensor, idx, 0.07, reduction="none"),),
            lambda x: (formulas.sampled_info_nce(x, bank.tensor.double(), idx, 0.07,
                                            reduction="none"),), [f], [g])


# ----------------------------------------------------------------------------------------------
# 3. A short training run
# ----------------------------------------------------------------------------------------------
def train(run: Run) -> None:
    out = run.out / "train_simclr"
    data = []
    if run.smoke:  # 32 random 8x8 images instead of the 1797 digits
        import numpy as np

        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (48, 8, 8), dtype=np.uint8), rng.integers(0, 3, 48)
        np.savez(run.out / "tiny.npz", x_train=x[:32], y_train=y[:32], x_test=x[32:],
                 y_test=y[32:])
        data = ["--data", str(run.out / "tiny.npz")]
    cmd = [sys.executable, "-m", "fastcl", "train", "simclr", "--precision", "bf16", "--device",
           run.device, "--out", str(out), "--no-progress", *data, *run.size["train"]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          timeout=max(30, min(240, run.left())))
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-300:]}")
    metrics = (out / "metrics.json").read_text().replace("\n", " ")[:200]
    run.add("train simclr digits", "fastcl train", "bf16", ms=seconds * 1e3, detail=metrics)


# ----------------------------------------------------------------------------------------------
# 4. Training steps
# ----------------------------------------------------------------------------------------------
# Hyper-parameters replacing the methods' defaults: at 224 px the papers' ImageNet heads, queue
# and multi-crop (the values the HPARAMS help texts give); in smoke runs, fewer keys for the
# Triton interpreter.
STEP_HPARAMS = {
    "imagenet": {
        "simclr": dict(proj_hidden=2048, temperature=0.1),
        "mocov2": dict(mlp_hidden=2048, queue_size=65536, momentum=0.999),
        "mocov3": dict(proj_hidden=4096, proj_dim=256),
        "byol": dict(proj_hidden=4096, proj_dim=256),
        "simsiam": dict(proj_dim=2048, pred_hidden=512),
        "swav": dict(num_prototypes=3000, num_small_crops=6, temperature=0.1),
        "dino": dict(out_dim=65536, head_hidden=2048, bottleneck=256, num_local_crops=8,
                     student_temp=0.1, centering="ema", teacher_momentum=0.996),
        "supcon": dict(proj_hidden=2048),
    },
    "smoke": {"mocov2": dict(queue_size=32), "instdisc": dict(num_negatives=16)},
}


def train_step_order(run: Run) -> list[tuple[str, str]]:
    """(backbone, method) pairs, the most telling first (the budget skips the last): ResNet-50
    SimCLR, MoCo v3 and DINO, ViT-S/16 MoCo v3 and DINO, then every other method of
    train_step.py on each backbone of the size's every_method_on (smoke: ResNet-50 alone)."""
    first = [("resnet50", "simclr"), ("resnet50", "mocov3"), ("resnet50", "dino"),
             ("vit_s16", "mocov3"), ("vit_s16", "dino")]
    return first + [(b, m) for b in run.size["train_step"]["every_method_on"]
                    for m in train_step.METHODS if (b, m) not in first]


def step_backbone(run: Run, kind: str) -> torch.nn.Module:
    """ResNet-50 with the ImageNet stem, or ViT-S/16 (smoke: one block per stage at 1/8 width, a
    one-block ViT)."""
    s = run.size["train_step"]
    if kind == "resnet50":
        return ResNet(Bottleneck, s["layers"], 3, s["width"], stem="imagenet")
    return ViT(s["side"], 3, **s["vit"])


def train_steps(run: Run) -> None:
    """Each (backbone, method) of train_step_order, within the section's share of the budget."""
    s = run.size["train_step"]
    deadline = time.perf_counter() + min(max(run.left(), 0), s["seconds"])
    # Smoke: one CPU thread. The tiny steps are thousands of small parallel regions, which
    # OpenMP's spin-waiting makes several times slower on a shared machine.
    threads = torch.get_num_threads()
    if run.smoke:
        torch.set_num_threads(1)
    try:
        for kind, name in train_step_order(run):
            case = f"train_step {name} {kind} B={s['batch']} {s['side']}px"
            run.guarded(case, "fastcl vs naive", "bf16",
                        lambda: train_step_case(run, case, kind, name, deadline))
    finally:
        torch.set_num_threads(threads)


def train_step_case(run: Run, case: str, kind: str, name: str, deadline: float) -> None:
    """One method's whole training step (benchmarks/train_step.py's: augment, forward and loss
    under bf16 autocast, backward, optimizer, momentum / queue / bank updates) on channels-last
    weights and views, fastcl's fused ops against the naive formulas, each on its own copy of the
    same model from the same batch: `warmup` steps of each, then `rounds` rounds of one timed step
    of each (synchronized). Rows: median ms, images/s (the batch over it), the median per-round
    speed-up naive / impl (range in detail), the peak memory of a step above what was allocated
    before it. Skipped when the warm-up steps say the rounds would pass the deadline."""
    s, dev = run.size["train_step"], run.device
    if time.perf_counter() >= deadline:
        run.add(case, "fastcl vs naive", "bf16", status="skipped",
                detail="the train_step share of the budget is spent")
        return
    hparams = STEP_HPARAMS[s["hparams"]].get(name, {})
    method, cfg = train_step.build(name, backbone=step_backbone(run, kind), channels=3,
                                   side=s["side"], batch_size=s["batch"], hparams=hparams,
                                   num_items=s["num_items"])
    method.to(dev, memory_format=torch.channels_last)
    inputs = train_step.batch(cfg, 3, s["side"], s["num_items"], dev)
    impls = {"fastcl": train_step.training_step(False, bf16=True, channels_last=True),
             "naive": train_step.training_step(True, bf16=True, channels_last=True)}
    states = {impl: train_step.fresh_state(method, cfg, inputs) for impl in impls}
    del method

    def timed(impl):  # -> (ms, MiB above what was allocated before the step, CUDA only)
        sync(dev)
        if dev == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        impls[impl](*states[impl])
        sync(dev)
        ms = (time.perf_counter() - start) * 1e3
        return ms, (torch.cuda.max_memory_allocated() - base) / MiB if dev == "cuda" else None

    for _ in range(s["warmup"]):
        last = {impl: timed(impl)[0] for impl in impls}
    need = s["rounds"] * sum(last.values()) / 1e3
    left = deadline - time.perf_counter()
    if need > left:
        run.add(case, "fastcl vs naive", "bf16", status="skipped",
                detail=f"{s['rounds']} rounds would take ~{need:.0f} s, {left:.0f} s left")
        return
    times, peaks = {impl: [] for impl in impls}, {impl: [] for impl in impls}
    for _ in range(s["rounds"]):
        for impl in impls:
            ms, mib = timed(impl)
            times[impl].append(ms)
            peaks[impl].append(mib)
    for impl in impls:
        ms = statistics.median(times[impl])
        ratios = [n / t for n, t in zip(times["naive"], times[impl])]
        run.add(case, impl, "bf16", ms=ms, images_s=s["batch"] / ms * 1e3,
                speedup=statistics.median(ratios),
                peak_mib=None if dev != "cuda" else max(peaks[impl]),
                detail=f"speed-up range {min(ratios):.2f}-{max(ratios):.2f} over {s['rounds']} "
                       f"rounds after {s['warmup']} warm-up steps; channels-last, bf16 autocast")


# ----------------------------------------------------------------------------------------------
# 5. Benchmarks
# ----------------------------------------------------------------------------------------------
def fwd_bwd(loss_fn, inputs):
    """A closure computing loss_fn(*inputs) and backpropagating it, freeing the gradients."""
    def step():
        loss_fn(*inputs).backward()
        for x in inputs:
            x.grad = None
    return step


def compiled(fn, run: Run):
    """torch.compile of fn on CUDA; the eager backend in smoke runs (same wrapper, no compiler)."""
    return torch.compile(fn, backend="eager" if run.smoke else "inductor")


def bench(run, case, dtype, impls, flops=None, nbytes=None, deferred=None):
    """Times each (impl name -> step maker) and records time, peak memory, TFLOP/s and GB/s.
    torch.compile baselines go to the deferred list when one is given (their compile takes tens
    of seconds: they run after every other case, so the budget skips them first)."""
    for impl, make_step in impls.items():
        if deferred is not None and impl.startswith("torch.compile"):
            deferred.append((case, dtype, {impl: make_step}, flops, nbytes))
            continue
        def measure(impl=impl, make_step=make_step):
            step = make_step()
            step()  # compile / autotune outside the timing
            sync(run.device)
            ms = median_ms(step, run.device)
            run.add(case, impl, dtype, ms=ms, peak_mib=peak_mib(step, run.device),
                    tflops=flops / ms / 1e9 if flops else None,
                    gbps=nbytes / ms / 1e6 if nbytes else None)
        run.guarded(case, impl, dtype, measure)


def _peers():
    """Importable peer implementations (none is required)."""
    peers = {}
    try:
        from open_clip.loss import ClipLoss

        peers["open_clip ClipLoss"] = ClipLoss
    except Exception:
        pass
    try:
        from inf_cl import cal_inf_loss

        peers["inf_cl"] = cal_inf_loss
    except Exception:
        pass
    return peers


def benchmarks(run: Run) -> None:
    s, dev, half = run.size, run.device, DTYPES[run.half]
    peers = _peers()
    use_compile = run.compile_baselines
    later: list = []
    for m, d in s["ntx_bench"]:
        z1, z2 = (torch.randn(m // 2, d, device=dev, dtype=half, requires_grad=True)
                  for _ in range(2))
        impls = {"fastcl": lambda: fwd_bwd(lambda a, b: fastcl.nt_xent(a, b, 0.1), [z1, z2]),
                 "naive": lambda: fwd_bwd(lambda a, b: formulas.nt_xent(a, b, 0.1), [z1, z2])}
        if use_compile and (m, d) == s["ntx_bench"][0]:
            impls["torch.compile(naive)"] = lambda z1=z1, z2=z2: fwd_bwd(  # runs after the loop
                compiled(lambda a, b: formulas.nt_xent(a, b, 0.1), run), [z1, z2])
        bench(run, f"nt_xent 2N={m} D={d}", run.half, impls, flops=6 * m * m * d,
              nbytes=4 * m * d * 2, deferred=later)

    b, k, d = s["queue"]
    q, key = (torch.randn(b, d, device=dev, dtype=half, requires_grad=True) for _ in range(2))
    queue = F.normalize(torch.randn(k, d, device=dev), dim=1).to(half)
    impls = {"fastcl": lambda: fwd_bwd(lambda a, c: fastcl.info_nce(a, c, queue, 0.07), [q, key]),
             "naive (MoCo)": lambda: fwd_bwd(lambda a, c: formulas.info_nce(a, c, queue, 0.07),
                                             [q, key])}
    if use_compile:
        impls["torch.compile(naive)"] = lambda: fwd_bwd(
            compiled(lambda a, c: formulas.info_nce(a, c, queue, 0.07), run), [q, key])
    bench(run, f"info_nce queue B={b} K={k} D={d}", run.half, impls, flops=4 * b * (k + 1) * d,
          nbytes=(k + 4 * b) * d * 2, deferred=later)

    n, d = s["clip"]
    x, y = (torch.randn(n, d, device=dev, dtype=half, requires_grad=True) for _ in range(2))
    impls = {"fastcl": lambda: fwd_bwd(
                 lambda a, c: fastcl.info_nce(a, c, None, 0.07, symmetric=True), [x, y]),
             "naive (CLIP)": lambda: fwd_bwd(
                 lambda a, c: formulas.info_nce(a, c, None, 0.07, symmetric=True), [x, y])}
    if "open_clip ClipLoss" in peers:
        clip = peers["open_clip ClipLoss"]()
        impls["open_clip ClipLoss"] = lambda: fwd_bwd(
            lambda a, c: clip(F.normalize(a, dim=1), F.normalize(c, dim=1), 1 / 0.07), [x, y])
    if "inf_cl" in peers:
        impls["inf_cl"] = lambda: fwd_bwd(lambda a, c: peers["inf_cl"](
            F.normalize(a, dim=1), F.normalize(c, dim=1), scale=1 / 0.07).mean(), [x, y])
    bench(run, f"clip N={n} D={d}", run.half, impls, flops=3 * 2 * 2 * n * n * d,
          nbytes=4 * n * d * 2, deferred=later)

    n, d = s["supcon"]
    x = torch.randn(n, d, device=dev, dtype=half, requires_grad=True)
    labels = torch.randint(0, max(2, n // 8), (n,), device=dev)
    bench(run, f"supcon M={n} D={d}", run.half,
          {"fastcl": lambda: fwd_bwd(lambda a: fastcl.supcon(a, labels, 0.1), [x]),
           "naive (SupContrast)": lambda: fwd_bwd(lambda a: formulas.supcon(a, labels, 0.1), [x])},
          flops=6 * n * n * d, nbytes=2 * n * d * 2, deferred=later)

    n, d = s["siglip"]
    for dtype in (run.half, "fp32"):
        x, y = (F.normalize(torch.randn(n, d, device=dev), dim=1).to(DTYPES[dtype])
                .requires_grad_() for _ in range(2))
        log_scale = torch.tensor(2.3, device=dev, requires_grad=True)
        bias = torch.tensor(-10.0, device=dev, requires_grad=True)
        impls = {"fastcl": lambda: fwd_bwd(lambda a, c, t, b: fastcl.siglip(a, c, t.exp(), b),
                                           [x, y, log_scale, bias]),
                 "naive (open_clip)": lambda: fwd_bwd(
                     lambda a, c, t, b: formulas.siglip(a, c, t.exp(), b), [x, y, log_scale, bias])}
        if use_compile:
            impls["torch.compile(naive)"] = lambda x=x, y=y, t=log_scale, b=bias: fwd_bwd(
                compiled(lambda a, c, t, b: formulas.siglip(a, c, t.exp(), b), run), [x, y, t, b])
        bench(run, f"siglip N={n} D={d}", dtype, impls, flops=3 * 2 * n * n * d,
              nbytes=4 * n * d * DTYPES[dtype].itemsize, deferred=later)

    crops, t_crops, b, k = s["dino_bench"]
    student = torch.randn(crops, b, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(t_crops, b, k, device=dev, dtype=torch.bfloat16)
    center = torch.zeros(k, device=dev)
    impls = {"fastcl": lambda: fwd_bwd(
                 lambda a: fastcl.dino_loss(a, teacher, center, 0.1, 0.04), [student]),
             "naive (DINO)": lambda: fwd_bwd(
                 lambda a: formulas.dino_loss(a, teacher, center, 0.1, 0.04), [student])}
    if use_compile:
        impls["torch.compile(naive)"] = lambda: fwd_bwd(
            compiled(lambda a: formulas.dino_loss(a, teacher, center, 0.1, 0.04), run), [student])
    bench(run, f"dino S={crops} B={b} K={k}", "bf16", impls,
          nbytes=(2 * crops + t_crops) * b * k * 2, deferred=later)

    crops, t_crops, b, h, k = s["dino_head"]
    n_tokens = s["ibot_tokens"]
    ibot_formula, ibot_fused = _ibot(n_tokens, b)
    for dtype in (run.half, "fp32"):
        student_shape, teacher_shape = (crops, b, h), (t_crops, b, h)
        for case, shapes, impls in [
                (f"dino_head S={crops} T={t_crops} B={b} H={h} K={k}",
                 (student_shape, teacher_shape),
                 {"fastcl": dino_fused, "head + fastcl.dino_loss": dino_head_then_fastcl,
                  "head + naive (DINO)": dino_head_then_formula}),
                (f"ibot_head N={n_tokens} H={h} K={k}", ((n_tokens, h), (n_tokens, h)),
                 {"fastcl": ibot_fused, "head + naive (iBOT)": ibot_formula})]:
            inputs = _head_inputs(dev, DTYPES[dtype], *shapes, h, k)()
            bench(run, case, dtype, {impl: lambda fn=fn, x=inputs: fwd_bwd(fn, x)
                                     for impl, fn in impls.items()},
                  flops=2 * h * k * (3 * math.prod(shapes[0][:-1]) + math.prod(shapes[1][:-1])),
                  deferred=later)

    rows, cols = s["sinkhorn"]
    scores = F.normalize(torch.randn(rows, cols, device=dev), dim=1)
    impls = {"fastcl": lambda: lambda: fastcl.sinkhorn(scores, 0.05, 3),
             "naive (SwAV)": lambda: lambda: formulas.sinkhorn(scores, 0.05, 3)}
    if use_compile:
        swav = compiled(lambda x: formulas.sinkhorn(x, 0.05, 3), run)
        impls["torch.compile(naive)"] = lambda: lambda: swav(scores)
    bench(run, f"sinkhorn {rows}x{cols}", "fp32", impls, nbytes=2 * rows * cols * 4, deferred=later)

    shapes = resnet50_shapes(16 if run.smoke else 1)
    target = [torch.randn(sh, device=dev) for sh in shapes]
    online = [torch.randn(sh, device=dev) for sh in shapes]
    numel = sum(t.numel() for t in target)

    def naive_ema():  # MoCo's / DINO's loop
        for t, o in zip(target, online):
            t.mul_(0.996).add_(o, alpha=0.004)

    bench(run, "momentum resnet50", "fp32",
          {"fastcl": lambda: lambda: fastcl.momentum_update(target, online, 0.996),
           "naive loop": lambda: naive_ema,
           "torch._foreach_lerp_": lambda: lambda: torch._foreach_lerp_(target, online, 0.004)},
          nbytes=12 * numel, deferred=later)

    b, k, d, n = s["bank"]
    bank = F.normalize(torch.randn(n, d, device=dev), dim=1)
    idx = torch.randint(0, n, (b, k + 1), device=dev)
    f = torch.randn(b, d, device=dev, requires_grad=True)
    bench(run, f"sampled_info_nce B={b} K={k} D={d}", "fp32",
          {"fastcl": lambda: fwd_bwd(lambda a: fastcl.sampled_info_nce(a, bank, idx, 0.07), [f]),
           "naive (InstDisc)": lambda: fwd_bwd(
               lambda a: formulas.sampled_info_nce(a, bank, idx, 0.07), [f])},
          flops=4 * b * (k + 1) * d, nbytes=2 * b * (k + 1) * d * 4, deferred=later)
    for case, dtype, impls, flops, nbytes in later:
        bench(run, case, dtype, impls, flops, nbytes)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def plot(run: Run) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    timed = [r for r in run.rows if r.get("ms") not in ("", None) and r["status"] == "ok"
             and not r["case"].startswith(("ceiling", "train"))]
    if not timed:
        return
    cases = list(dict.fromkeys(r["case"] for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(cases) + 2))
    height = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        ys, xs = [], []
        for i, case in enumerate(cases):
            for r in timed:
                if r["case"] == case and r["impl"] == impl:
                    ys.append(i + j * height)
                    xs.append(float(r["ms"]))
        ax.barh(ys, xs, height=height, label=impl)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases)
    ax.set_xscale("log")
    ax.set_xlabel("ms (median, forward + backward)")
    ax.set_title(f"fastcl on {run.meta['device']} (torch {run.meta['torch']}, "
                 f"triton {run.meta['triton']}, {run.meta['commit']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run.csv.with_suffix(".png"), dpi=120)
    plt.close(fig)


def table(run: Run) -> str:
    cols = ["case", "impl", "dtype", "ms", "peak_mib", "tflops", "gbps", "images_s", "speedup",
            "status", "detail"]
    lines = [" | ".join(cols)]
    for r in run.rows:
        lines.append(" | ".join(str(r.get(c, ""))[:70] for c in cols))
    bad = [r for r in run.rows if r["status"] in ("FAIL", "error")]
    lines.append(f"{len(run.rows)} rows, {len(bad)} failed or errored, "
                 f"{sum(r['status'] == 'skipped' for r in run.rows)} skipped; "
                 f"ceilings: {run.ceilings}; {time.perf_counter() - run.start:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/out", help="folder for the CSV and the PNG")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU, Triton kernels under TRITON_INTERPRET=1")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which the remaining cases are skipped (default 420; "
                        "smoke: none)")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile baselines")
    p.add_argument("--sections", nargs="*",
                   default=["ceilings", "check", "train", "train_step", "bench"],
                   choices=["ceilings", "check", "train", "train_step", "bench"])
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device; use --smoke for the CPU run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (math.inf if args.smoke else 420)
    run = Run(out, args.smoke, budget, not args.no_compile)
    torch.manual_seed(0)
    sections = dict(ceilings=ceilings, check=lambda r: (check_contrastive(r), check_others(r)),
                    train=lambda r: r.guarded("train simclr digits", "fastcl train", "bf16",
                                              lambda: train(r)),
                    train_step=train_steps, bench=benchmarks)
    for name in args.sections:
        try:
            sections[name](run)
        except Exception as e:  # a section's own set-up failed: recorded, the others still run
            run.add(name, "section", status="error", detail=f"{type(e).__name__}: {e}"[:300])
            traceback.print_exc()
    plot(run)
    print(table(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
