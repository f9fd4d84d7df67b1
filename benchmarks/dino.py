"""DINO-loss benchmark: fastcl's fused dino_loss against the official DINO formula and
torch.compile of it, in a training loop and as single calls (benchmarks/harness.py): forward +
backward, and the forward alone (what autograd keeps for backward).

    python benchmarks/dino.py                 # B = 64, S = 10, T = 2, K = 65536 (DINO, per GPU)
    python benchmarks/dino.py --quick --no-compile   # K = 1024, a smoke test
    python benchmarks/dino.py --csv out.csv --plot out.png
"""
from __future__ import annotations

import torch

from fastcl import formulas
from fastcl.losses.dino import dino_loss
from harness import Case, bench_main


def cases(device: str, quick: bool):
    """DINO-like logits: student (S, B, K) requiring grad, teacher (T, B, K), center (1, K)."""
    s, t, b, k = 10, 2, 64, 1024 if quick else 65536
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def inputs():
        return [torch.randn(s, b, k, device=device).to(dtype).requires_grad_(),
                torch.randn(t, b, k, device=device).to(dtype),
                0.1 * torch.randn(1, k, device=device)]

    impls = {"fastcl": dino_loss, "official (DINO code)": formulas.dino_loss}
    for mode, backward in [("fwd+bwd", True), ("fwd", False)]:
        yield Case(f"dino S={s} T={t} B={b} K={k} {mode}", inputs, impls, "official (DINO code)",
                   dtype, backward=backward)


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], cases, "fastcl DINO loss")
