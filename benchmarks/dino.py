"""DINO-loss benchmark: fastcl's fused dino_loss against the official DINO formula (and, on a GPU,
torch.compile of it), measured in the same process: forward + backward, and forward alone.

    python benchmarks/dino.py                 # B = 64, S = 10, T = 2, K = 65536 (DINO, per GPU)
    python benchmarks/dino.py --quick         # K = 8192, a smoke test
    python benchmarks/dino.py --csv out.csv --plot out.png

Time is the median of --repeats runs; memory is the peak above the inputs during one run (CPU:
resident set size, GPU: torch's allocator), with the helpers of benchmarks/contrastive.py.
"""
from __future__ import annotations

import torch

from contrastive import bench_main, forward_backward, measure_case
from fastcl import formulas
from fastcl.losses.dino import dino_loss


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


def run(device: str, quick: bool, repeats: int, only: str = ""):
    s, t, b, k = 10, 2, 64, 8192 if quick else 65536
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = {"fastcl": dino_loss, "official (DINO code)": formulas.dino_loss}
    if device == "cuda":
        impls["official + torch.compile"] = torch.compile(formulas.dino_loss)
    inputs = make_inputs(s, t, b, k, device, dtype)
    rows = []
    for mode, closure in [("fwd+bwd", forward_backward), ("fwd", forward_only)]:
        case = f"dino S={s} T={t} B={b} K={k} {mode}"
        if only in case:
            steps = {impl: closure(loss_fn, inputs) for impl, loss_fn in impls.items()}
            rows += measure_case(case, dtype, steps, device, repeats, "official (DINO code)")
    return rows


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], run, "fastcl DINO loss")
