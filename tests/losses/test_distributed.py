"""gather=True with 2 gloo processes on CPU: W ranks x N rows give the same loss and gradients as
one process holding all W * N rows (the gradient of a rank's rows sums every rank's loss)."""

import pytest
import torch
import torch.distributed as dist

from fastcl import info_nce, nt_xent, supcon
from fastcl.losses.invaspread import invaspread
from tests.helpers import run_on_ranks

WORLD, N, D = 2, 6, 10


def _losses():
    """name -> loss(z1_rows, z2_rows, labels_rows, gather)."""
    return {
        "nt_xent": lambda a, b, y, g: nt_xent(a, b, 0.3, reduction="sum", gather=g),
        "info_nce": lambda a, b, y, g: info_nce(a, b, temperature=0.2, reduction="sum", gather=g),
        "symmetric": lambda a, b, y, g: info_nce(a, b, temperature=0.2, symmetric=True,
                                                 reduction="sum", gather=g),
        "supcon": lambda a, b, y, g: supcon(a + b, y, 0.1, reduction="sum", gather=g),
        "nt_xent_mean": lambda a, b, y, g: nt_xent(a, b, 0.3, gather=g),
        "invaspread": lambda a, b, y, g: invaspread(a, b, 0.2, reduction="sum", gather=g),
    }


def _worker(rank, results, z1, z2, labels):
    rows = slice(rank * N, (rank + 1) * N)
    for name, loss_fn in _losses().items():
        a = z1[rows].clone().requires_grad_()
        b = z2[rows].clone().requires_grad_()
        loss = loss_fn(a, b, labels[rows], True)
        loss.backward()
        results[(name, rank)] = (loss.detach(), a.grad, b.grad)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gather_equals_one_process():
    z1, z2 = torch.randn(WORLD * N, D), torch.randn(WORLD * N, D)
    labels = torch.randint(0, 4, (WORLD * N,))
    results = run_on_ranks(_worker, z1, z2, labels, world=WORLD)

    for name, loss_fn in _losses().items():
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = loss_fn(a, b, labels, False)
        loss.backward()
        per_rank = [results[(name, r)] for r in range(WORLD)]
        total = sum(r[0] for r in per_rank)
        # "sum" losses add up over ranks; "mean" ones average (as DDP averages gradients).
        mean = name.endswith("_mean")
        expected_total = loss * WORLD if mean else loss
        torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-5, msg=name)
        for r, (_, ga, gb) in enumerate(per_rank):
            rows = slice(r * N, (r + 1) * N)
            factor = WORLD if mean else 1
            torch.testing.assert_close(ga, factor * a.grad[rows], rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(gb, factor * b.grad[rows], rtol=1e-4, atol=1e-6, msg=name)
