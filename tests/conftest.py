"""Test set-up: Triton kernels run under the interpreter on machines without a GPU; that must be
decided before triton is first imported."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def backends():
    """(device, cpu backend) pairs every op test runs on: C++ and Triton-interpreter on CPU, the
    reference path, and the Triton kernels on CUDA where a GPU exists."""
    params = [pytest.param(("cpu", "cpp"), id="cpp"), pytest.param(("cpu", "reference"), id="ref")]
    triton_cpu = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
    params.append(pytest.param(("cpu", "triton"), id="triton-interpret", marks=triton_cpu))
    cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
    params.append(pytest.param(("cuda", "cpp"), id="cuda-triton", marks=cuda))
    return params


@pytest.fixture(params=backends())
def backend(request):
    """Yields the device to put tensors on, with the CPU backend switched for the test."""
    from fastcl.ops import cpu_backend

    from fastcl._backend import cpp_extension

    device, name = request.param
    if name == "cpp" and device == "cpu" and cpp_extension() is None:
        pytest.fail("the C++ extension fastcl._C is not built: pip install --no-build-isolation -e .")
    with cpu_backend(name):
        yield device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_on_ranks(worker, *args, world=2):
    """Runs worker(rank, results, *args) in `world` gloo processes on this machine; returns the
    dict the workers filled."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(world, port, worker, args, results), nprocs=world, join=True)
        return dict(results)


def _rank_main(rank, world, port, worker, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, results, *args)
    finally:
        dist.destroy_process_group()


def train_on_batch(method, views, steps, *, epoch=0, lr=3e-3, **extras):
    """Adam on one fixed batch of augmented views, stepping the method as the trainer does
    (after_backward, after_step); returns the losses."""
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = method(views, epoch=epoch, **extras)
        opt.zero_grad()
        loss.backward()
        method.after_backward(epoch)
        opt.step()
        method.after_step(step, steps)
        losses.append(loss.item())
    return losses


def assert_decreasing(losses):
    """Finite losses whose last three average below their first three."""
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
