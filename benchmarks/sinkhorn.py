"""Sinkhorn-Knopp benchmark: fastcl's fused SwAV code assignment against SwAV's own code (the naive
formula, fastcl.formulas.sinkhorn) and torch.compile of it, in a training loop (a fresh
state, every step) and as single calls (benchmarks/harness.py).

    python benchmarks/sinkhorn.py                 # this machine's default device
    python benchmarks/sinkhorn.py --quick --no-compile   # small sizes, a smoke test
    python benchmarks/sinkhorn.py --csv out.csv --plot out.png
"""
from __future__ import annotations

import torch

from fastcl import formulas
from fastcl.ops.sinkhorn import sinkhorn
from harness import Case, bench_main


def cases(device: str, quick: bool):
    """SwAV's setting: eps 0.05, 3 iterations, K = 3000 prototypes; the codes need no gradient."""
    k = 3000
    impls = {"fastcl": lambda scores: sinkhorn(scores, 0.05, 3),
             "naive (SwAV)": lambda scores: formulas.sinkhorn(scores, 0.05, 3)}
    for b in [256] if quick else [4096, 4096 + 3840]:  # SwAV's batch, and with its queue
        def scores(b=b):
            z = torch.nn.functional.normalize(torch.randn(b, 128, device=device), dim=1)
            c = torch.nn.functional.normalize(torch.randn(k, 128, device=device), dim=1)
            return [z @ c.T]
        yield Case(f"sinkhorn B={b} K={k} 3 iters", scores, impls, "naive (SwAV)", backward=False)


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], cases, "fastcl Sinkhorn-Knopp", default_repeats=10)
