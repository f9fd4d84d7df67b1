"""Sinkhorn-Knopp benchmark: fastcl's fused SwAV code assignment against SwAV's own code (the naive
formula, fastcl.formulas.sinkhorn) and, on a GPU, torch.compile of it, measured in the same
process.

    python benchmarks/sinkhorn.py                 # this machine's default device
    python benchmarks/sinkhorn.py --quick         # small sizes, a smoke test
    python benchmarks/sinkhorn.py --csv out.csv --plot out.png

Prints a table of median time and peak memory above the inputs for each case and implementation
(memory as in benchmarks/contrastive.py, whose measurement and output helpers this script uses).
"""
from __future__ import annotations

import torch

from contrastive import bench_main, measure_case
from fastcl.formulas import sinkhorn as sinkhorn_ref
from fastcl.ops.sinkhorn import sinkhorn


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


def run(device: str, quick: bool, repeats: int, only: str = ""):
    rows = []
    for name, make_scores, impls in cases(device, quick):
        if only not in name:
            continue
        if device == "cuda":
            impls = dict(impls, **{"naive (SwAV) + torch.compile": torch.compile(sinkhorn_ref)})
        scores = make_scores()
        steps = {impl: (lambda fn=fn: fn(scores, 0.05, 3)) for impl, fn in impls.items()}
        rows += measure_case(name, torch.float32, steps, device, repeats, "naive (SwAV)")
        del scores, steps
    return rows


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], run, "fastcl Sinkhorn-Knopp", default_repeats=10)
