"""SigLIP-loss benchmark: fastcl's fused siglip against open_clip's SigLipLoss formula
(fastcl.formulas.siglip: dense logits, a labels matrix, logsigmoid) and torch.compile of it,
forward + backward with a learned log-scale and bias, in a training loop and as single calls
(benchmarks/harness.py).

    python benchmarks/siglip.py                 # N = 16384, D = 256 (fp32 on CPU, bf16 on CUDA)
    python benchmarks/siglip.py --quick --no-compile   # N = 256, a smoke test
    python benchmarks/siglip.py --csv out.csv --plot out.png
"""
from __future__ import annotations

import torch

from fastcl import formulas, siglip
from harness import Case, bench_main


def cases(device: str, quick: bool):
    """Unit-norm image and text rows (N, D) requiring grad, log-scale log 10 and bias -10 (SigLIP's
    initialization) requiring grad."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n, d = (256 if quick else 16384), 256

    def inputs():
        rows = [torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)
                for _ in range(2)]
        scalars = [torch.tensor(2.302585, device=device), torch.tensor(-10.0, device=device)]
        return [t.requires_grad_() for t in rows + scalars]

    impls = {"fastcl": lambda x, y, log_scale, bias: siglip(x, y, log_scale.exp(), bias),
             "naive (open_clip)": lambda x, y, log_scale, bias: formulas.siglip(
                 x, y, log_scale.exp(), bias)}
    yield Case(f"siglip N={n} D={d}", inputs, impls, "naive (open_clip)", dtype)
    if device == "cuda" and not quick:
        def fp32_inputs():
            return [t.detach().float().requires_grad_() for t in inputs()]

        yield Case(f"siglip N={n} D={d} fp32", fp32_inputs, impls, "naive (open_clip)",
                   torch.float32)


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], cases, "fastcl SigLIP loss")
