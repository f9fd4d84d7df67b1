"""Contrastive-loss benchmark: fastcl's fused losses against the naive formulas and torch.compile
of them, forward + backward, in a training loop and as single calls (benchmarks/harness.py).

    python benchmarks/contrastive.py                 # this machine's default device
    python benchmarks/contrastive.py --quick --no-compile   # tiny sizes, a smoke test
    python benchmarks/contrastive.py --csv out.csv --plot out.png
"""
from __future__ import annotations

import torch

from fastcl import formulas, info_nce, nt_xent, supcon
from harness import Case, bench_main


def unit(*shape, device, dtype, grad=True):
    """Unit-norm rows of a random (.., D) tensor, a leaf requiring grad when `grad`."""
    x = torch.nn.functional.normalize(torch.randn(*shape, device=device), dim=-1).to(dtype)
    return x.requires_grad_(grad)


def cases(device: str, quick: bool):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    big = 1 if quick else (4 if device == "cuda" else 1)
    d = 128

    def views(n, *extra):
        return lambda: [unit(n, d, device=device, dtype=dtype),
                        unit(n, d, device=device, dtype=dtype), *[f() for f in extra]]

    two_n = (256 if quick else 16384) * big
    yield Case(f"nt_xent 2N={two_n} D={d}", views(two_n // 2),
               {"fastcl": nt_xent, "naive": formulas.nt_xent}, "naive", dtype)
    if not quick:
        huge = 65536 if device == "cpu" else 131072
        yield Case(f"nt_xent 2N={huge} D={d}", views(huge // 2), {"fastcl": nt_xent}, "naive",
                   dtype, compile=())
    k = 1024 if quick else 65536
    queue = lambda: unit(k, d, device=device, dtype=dtype, grad=False)  # noqa: E731
    yield Case(f"info_nce N=256 queue={k} D={d} (MoCo)", views(256, queue),
               {"fastcl": info_nce, "naive": formulas.info_nce}, "naive", dtype)
    n = (128 if quick else 8192) * big
    yield Case(f"info_nce symmetric N={n} D={d}", views(n),
               {"fastcl": lambda q, k: info_nce(q, k, symmetric=True),
                "naive": lambda q, k: formulas.info_nce(q, k, symmetric=True)}, "naive", dtype)
    labels = lambda: torch.randint(0, 100, (n,), device=device)  # noqa: E731
    yield Case(f"supcon M={n} D={d} 100 classes",
               lambda: [unit(n, d, device=device, dtype=dtype), labels()],
               {"fastcl": supcon, "naive": formulas.supcon}, "naive", dtype)


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], cases, "fastcl contrastive losses")
