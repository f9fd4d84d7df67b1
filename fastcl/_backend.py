"""Where each op's kernels come from: the C++ extension (CPU), the Triton kernels (CUDA) or the
PyTorch reference.

Nothing here touches CUDA or imports triton at import time. The CPU backend can be overridden,
e.g. to run the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1`` in tests:

    FASTCL_CPU_BACKEND=cpp|triton|reference   (default: cpp)

or, inside a process, with ``fastcl.ops.cpu_backend("triton")``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

_BUILD_HINT = (
    "fastcl's C++ extension (fastcl._C) is not built, so the CPU ops fall back to the slower PyTorch "
    "reference. Build it with:  pip install --no-build-isolation -e .   (from the fastcl checkout; "
    "FASTCL_SKIP_EXT=1 skips the build on purpose)"
)
_VALID = ("cpp", "triton", "reference")
_state = {"cpu": os.environ.get("FASTCL_CPU_BACKEND", "cpp"), "warned": False}
if _state["cpu"] not in _VALID:
    raise ValueError(f"FASTCL_CPU_BACKEND must be one of {_VALID}, got {_state['cpu']!r}")


def cpp_extension():
    """The compiled ``fastcl._C`` module, or None (with one warning) when it is not built."""
    try:
        return importlib.import_module("fastcl._C")
    except ImportError:
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(_BUILD_HINT, RuntimeWarning, stacklevel=3)
        return None


def triton_module(family: str):
    """The Triton kernels of one op family (``fastcl.kernels.<family>``); imported on first use."""
    return importlib.import_module(f"fastcl.kernels.{family}")


def cpu_backend_name() -> str:
    return _state["cpu"]


def accumulation_dtype(*tensors) -> torch.dtype:
    """Accumulation/output dtype of the ops: float32, or float64 when any of the given tensors is
    float64 (those run the reference)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kernels_for(x, family: str, triton_fits: bool = True):
    """The module with `family`'s fast kernels for tensor x, or None to run the reference:
    the C++ extension (or the chosen CPU backend) on CPU, Triton on CUDA when the shape fits
    (triton_fits), the reference on any other device and for float64."""
    if x.dtype == torch.float64:
        return None
    if x.device.type == "cpu":
        if _state["cpu"] == "cpp":
            return cpp_extension()
        return triton_module(family) if _state["cpu"] == "triton" else None
    if x.device.type == "cuda" and triton_fits:
        return triton_module(family)
    return None


@contextlib.contextmanager
def cpu_backend(name: str):
    """Temporarily run CPU tensors through another backend ("cpp", "triton" or "reference")."""
    if name not in _VALID:
        raise ValueError(f"cpu_backend: name must be one of {_VALID}, got {name!r}")
    previous, _state["cpu"] = _state["cpu"], name
    try:
        yield
    finally:
        _state["cpu"] = previous
