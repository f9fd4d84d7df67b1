"""Test set-up: Triton kernels run under the interpreter on machines without a GPU; that must be
decided before triton is first imported."""
import os

import pytest
import torch

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
