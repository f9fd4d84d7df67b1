"""gather="ring" with 2 and 4 gloo processes on CPU: W ranks x N rows give the loss and gradients of
one process holding all W * N rows (float64 truth), features, a learnable temperature (SigLIP:
scale and bias) alike.

The temperature's gradient is checked as the sum over ranks (what DistributedDataParallel
all-reduces): counted W times (an all-reduce inside the loss) or on one rank only, it fails."""

import pytest
import torch
import torch.distributed as dist

from fastcl import InfoNCELoss, SigLIPLoss, info_nce, nt_xent, siglip, supcon
from tests.conftest import HAS_TRITON
from tests.helpers import assert_close, run_on_ranks

D = 6
# Tolerances against the float64 single-process truth.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2}


def _losses():
    """name -> loss(z1_rows, z2_rows, labels_rows, temperature, bias, gather)."""
    return {
        "nt_xent": lambda a, b, y, t, c, g: nt_xent(a, b, t, reduction="sum", gather=g),
        "nt_xent_mean": lambda a, b, y, t, c, g: nt_xent(a, b, t, gather=g),
        "info_nce": lambda a, b, y, t, c, g: info_nce(a, b, temperature=t, reduction="sum",
                                                      gather=g),
        "symmetric": lambda a, b, y, t, c, g: info_nce(a, b, temperature=t, symmetric=True,
                                                       reduction="sum", gather=g),
        "clip_mean": lambda a, b, y, t, c, g: InfoNCELoss(t, symmetric=True, gather=g)(a, b),
        "supcon": lambda a, b, y, t, c, g: supcon(a + b, y, t, reduction="sum", gather=g),
        "supcon_views": lambda a, b, y, t, c, g: supcon(torch.stack([a, b], 1), y, t,
                                                        reduction="sum", gather=g),
        "siglip": lambda a, b, y, t, c, g: siglip(a, b, 1 / t, c, reduction="sum", gather=g),
        "siglip_mean": lambda a, b, y, t, c, g: SigLIPLoss(gather=g)(a, b, 1 / t, c),
    }


def _run(rows, z1, z2, labels, dtype, gather):
    """{name: (loss, dz1, dz2, dtemperature, dbias)} of the rows `rows` with a learnable
    temperature (and SigLIP's bias; its gradient is a zero for the other losses)."""
    out = {}
    for name, loss_fn in _losses().items():
        a = z1[rows].to(dtype).requires_grad_()
        b = z2[rows].to(dtype).requires_grad_()
        t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        c = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(a, b, labels[rows], t, c, gather)
        (1.7 * loss + 0 * c.to(loss.dtype)).backward()
        out[name] = (loss.detach(), a.grad, b.grad, t.grad, c.grad)
    return out


def _worker(rank, results, z1, z2, labels, n):
    rows = slice(rank * n, (rank + 1) * n)
    for dtype in TOL:
        results[(dtype, rank)] = _run(rows, z1, z2, labels, dtype, "ring")
    results[("all-gather", rank)] = _run(rows, z1, z2, labels, torch.float64, True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world,n", [(2, 5), (4, 7)])
def test_ring_equals_one_process(world, n):
    z1 = torch.randn(world * n, D, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(world * n, D, dtype=torch.float64)
    labels = torch.randint(0, 3, (world * n,))
    results = run_on_ranks(_worker, z1, z2, labels, n, world=world)
    truth = _run(slice(None), z1, z2, labels, torch.float64, False)

    for dtype, tol in TOL.items():
        per_rank = [results[(dtype, r)] for r in range(world)]
        for name, (loss, dz1, dz2, dt, dc) in truth.items():
            what = f"{name} {dtype} W={world}"
            # "sum" losses add up over ranks; "mean" ones average (as DDP averages gradients).
            factor = world if name.endswith("_mean") else 1
            assert_close(sum(r[name][0] for r in per_rank), factor * loss, tol, what + " loss")
            for r in range(world):
                rows = slice(r * n, (r + 1) * n)
                assert_close(per_rank[r][name][1], factor * dz1[rows], tol, what + " dz1")
                assert_close(per_rank[r][name][2], factor * dz2[rows], tol, what + " dz2")
            # Every pair's share of the temperature's gradient lands on exactly one rank.
            assert_close(sum(r[name][3] for r in per_rank), factor * dt, tol, what + " dtemp")
            assert_close(sum(r[name][4] for r in per_rank), factor * dc, tol, what + " dbias")

    # Per rank, the loss and feature gradients are gather=True's, and so is the temperature's
    # gradient where a rank's loss is its own rows' (all but CLIP's column direction).
    for r in range(world):
        ring, gathered = results[(torch.float64, r)], results[("all-gather", r)]
        for name in ring:
            outputs = 3 if name in ("symmetric", "clip_mean") else 5
            for i in range(outputs):
                assert_close(ring[name][i], gathered[name][i], 1e-10, f"{name} rank {r} [{i}]")


def _backend_worker(rank, results, z1, z2, labels, n, backend):
    from fastcl.ops import cpu_backend

    with cpu_backend(backend):
        results[rank] = _run(slice(rank * n, (rank + 1) * n), z1, z2, labels, torch.float32,
                             "ring")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_ring_blocks_on_triton():
    """The ring's blocks run whatever the dispatcher picks: above the C++ kernels (fp32) and the
    reference (float64), here the Triton kernels (interpreted), against the float64 truth."""
    world, n, backend = 2, 3, "triton"
    z1 = torch.randn(world * n, D, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(world * n, D, dtype=torch.float64)
    labels = torch.randint(0, 2, (world * n,))
    results = run_on_ranks(_backend_worker, z1, z2, labels, n, backend, world=world)
    truth = _run(slice(None), z1, z2, labels, torch.float64, False)
    for name, (loss, dz1, dz2, dt, dc) in truth.items():
        factor = world if name.endswith("_mean") else 1
        assert_close(sum(results[r][name][0] for r in range(world)), factor * loss, 2e-5, name)
        assert_close(sum(results[r][name][3] for r in range(world)), factor * dt, 2e-5, name)
        assert_close(sum(results[r][name][4] for r in range(world)), factor * dc, 2e-5, name)
        for r in range(world):
            rows = slice(r * n, (r + 1) * n)
            assert_close(results[r][name][1], factor * dz1[rows], 2e-5, name)
            assert_close(results[r][name][2], factor * dz2[rows], 2e-5, name)


def test_ring_on_one_process_is_local():
    z1, z2 = torch.randn(9, D, dtype=torch.float64), torch.randn(9, D, dtype=torch.float64)
    labels = torch.randint(0, 3, (9,))
    ring = _run(slice(None), z1, z2, labels, torch.float32, "ring")
    local = _run(slice(None), z1, z2, labels, torch.float32, False)
    for name in ring:
        for x, y in zip(ring[name], local[name]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("gather,error", [("all", ValueError), (1, TypeError), (None, TypeError)])
def test_bad_gather(gather, error):
    z = torch.randn(4, D)
    with pytest.raises(error, match="gather"):
        nt_xent(z, z, gather=gather)
    with pytest.raises(error, match="gather"):
        info_nce(z, z, gather=gather)
    with pytest.raises(error, match="gather"):
        supcon(z, torch.zeros(4, dtype=torch.long), gather=gather)
    with pytest.raises(error, match="gather"):
        siglip(z, z, 10.0, -10.0, gather=gather)
    with pytest.raises(error, match="gather"):
        InfoNCELoss(gather=gather)
    with pytest.raises(error, match="gather"):
        SigLIPLoss(gather=gather)


def test_invaspread_refuses_ring():
    from fastcl.losses.invaspread import invaspread

    z = torch.randn(4, D)
    with pytest.raises(ValueError, match="ring"):
        invaspread(z, z, gather="ring")
