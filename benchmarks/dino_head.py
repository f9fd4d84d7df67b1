"""DINO-head benchmark: fastcl's dino_head_loss / ibot_patch_loss (the head's last layer fused with
the loss) against DINOHead's weight-normalized last layer followed by the official loss formula
(fastcl.formulas), and followed by fastcl.dino_loss, in a training loop and as single calls
(benchmarks/harness.py): forward + backward of the features and the prototypes' direction v.

    python benchmarks/dino_head.py           # S = 10, T = 2, B = 64, H = 256, K = 65536; iBOT at
                                             # B x 0.3 x 196 masked tokens
    python benchmarks/dino_head.py --quick --no-compile   # K = 1024, a smoke test

The last layer is nn.utils.weight_norm(nn.Linear(H, K, bias=False)) with its g fixed at 1 as in
DINOHead (norm_last_layer): each implementation computes W = torch._weight_norm(v, g, 0), what the
weight-norm hook computes, and the teacher's W_t under no_grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastcl
from fastcl import formulas
from harness import Case, bench_main


def _weights(v, g, v_teacher, g_teacher):
    with torch.no_grad():
        teacher_weight = torch._weight_norm(v_teacher, g_teacher, 0)
    return torch._weight_norm(v, g, 0), teacher_weight


def _head_inputs(device, dtype, rows_student, rows_teacher, h, k):
    def unit(*shape):
        return F.normalize(torch.randn(*shape, device=device), dim=-1).to(dtype)

    def inputs():
        return [unit(*rows_student).requires_grad_(), unit(*rows_teacher),
                torch.randn(k, h, device=device).to(dtype).requires_grad_(),
                torch.ones(k, 1, device=device, dtype=dtype),
                torch.randn(k, h, device=device).to(dtype),
                torch.ones(k, 1, device=device, dtype=dtype),
                0.1 * torch.randn(1, k, device=device)]
    return inputs


def dino_head_then_formula(student, teacher, v, g, v_t, g_t, center):
    w, w_t = _weights(v, g, v_t, g_t)
    return formulas.dino_loss(student @ w.T, teacher @ w_t.T, center)


def dino_head_then_fastcl(student, teacher, v, g, v_t, g_t, center):
    w, w_t = _weights(v, g, v_t, g_t)
    return fastcl.dino_loss(student @ w.T, teacher @ w_t.T, center)


def dino_fused(student, teacher, v, g, v_t, g_t, center):
    w, w_t = _weights(v, g, v_t, g_t)
    return fastcl.dino_head_loss(student, teacher, w, w_t, center)


def _ibot(n, n_images):
    """The three iBOT implementations for N masked tokens of n_images images (per-token weights
    1 / (masked tokens of its image), images of equal counts)."""
    def weights(student):
        return torch.full((n,), n_images / n, device=student.device)

    def then_formula(student, teacher, v, g, v_t, g_t, center):
        w, w_t = _weights(v, g, v_t, g_t)
        return formulas.ibot_patch_loss(student @ w.T, teacher @ w_t.T, center, weights(student),
                                        n_images)

    def fused(student, teacher, v, g, v_t, g_t, center):
        w, w_t = _weights(v, g, v_t, g_t)
        return fastcl.ibot_patch_loss(student, teacher, w, w_t, center, weights(student),
                                      n_images=n_images)

    return then_formula, fused


def cases(device: str, quick: bool):
    s, t, b, h, k = 10, 2, 64, 256, 1024 if quick else 65536
    dtype = torch.float32
    impls = {"fastcl.dino_head_loss": dino_fused, "head + fastcl.dino_loss": dino_head_then_fastcl,
             "head + official formula": dino_head_then_formula}
    yield Case(f"dino head S={s} T={t} B={b} H={h} K={k} fwd+bwd",
               _head_inputs(device, dtype, (s, b, h), (t, b, h), h, k), impls,
               "head + official formula", dtype)
    n = int(b * 0.3 * 196)
    then_formula, fused = _ibot(n, b)
    yield Case(f"ibot head N={n} H={h} K={k} fwd+bwd",
               _head_inputs(device, dtype, (n, h), (n, h), h, k),
               {"fastcl.ibot_patch_loss": fused, "head + official formula": then_formula},
               "head + official formula", dtype)


if __name__ == "__main__":
    bench_main(__doc__.split("\n")[0], cases, "fastcl DINO head + loss", default_repeats=3)
