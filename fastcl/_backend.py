"""Where each op's kernels come from, chosen by PyTorch's dispatcher per device: the C++ extension
(``fastcl._C``) for CPU tensors, the Triton kernels (``fastcl.kernels.<family>``) for CUDA tensors,
the op's own body (its PyTorch reference) on any other device.

Each family registers its ops with ``register_backends``: the ``torch.library.custom_op`` body
runs the reference and stays the default kernel, and ``op.register_kernel("cpu" / "cuda")`` adds
the fast paths, which fall back to the reference for float64 inputs, shapes the Triton kernels do
not take, and (on CPU) a missing extension. The dispatcher, not module state, picks the device:
one op, per-device kernels, as torchao does with ``TORCH_LIBRARY_IMPL``.

The one setting left is what runs CPU tensors, e.g. the Triton kernels under
``TRITON_INTERPRET=1`` in tests, or the reference:

    FASTCL_CPU_BACKEND=cpp|triton|reference   (default: cpp)

or, inside a process, ``fastcl.ops.cpu_backend("triton")``. Nothing here touches CUDA or imports
triton at import time.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable, Optional, Union

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
    """What runs CPU tensors: "cpp", "triton" or "reference"."""
    return _state["cpu"]


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


def accumulation_dtype(*tensors) -> torch.dtype:
    """Accumulation/output dtype of the ops: float32, or float64 when any of the given tensors is
    float64 (those run the reference)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


Launch = Union[str, Callable]


def _launcher(launch: Launch) -> Callable:
    """launch(kernels, *args), from a callable or the name of a launcher taking the op's args."""
    if isinstance(launch, str):
        return lambda kernels, *args: getattr(kernels, launch)(*args)
    return launch


def rows_up_to(max_dim: int) -> Callable[..., bool]:
    """A triton_fits predicate: the op's first argument (..., D) has D <= max_dim (the Triton
    kernels keep a whole row in registers)."""
    return lambda first, *_: first.shape[-1] <= max_dim


def register_backends(op, family: Optional[str], reference: Callable, launch: Launch, *,
                      cpp_launch: Optional[Launch] = None,
                      triton_fits: Optional[Callable[..., bool]] = None) -> None:
    """Registers the fast kernels of the custom op `op` with PyTorch's dispatcher: a CPU kernel
    running the C++ extension (or the backend cpu_backend / FASTCL_CPU_BACKEND chose) and a CUDA
    kernel running the Triton kernels of ``fastcl.kernels.<family>``. op's body, which runs the
    reference, stays the default for every other device; its fake runs for meta / fake tensors.

    reference(*args): the op's reference, called with the op's arguments. Both kernels run it for
        float64 inputs (op's first argument; ops over lists of tensors choose per tensor in their
        launch), arguments the Triton kernels do not take (triton_fits), and on CPU without a
        built extension (one warning) or under cpu_backend("reference").
    launch: launch(kernels, *args) running the op on `kernels`, the module ``fastcl._C`` or
        ``fastcl.kernels.<family>`` (whose launchers share names and contracts), or the name of
        the launcher to call with the op's arguments.
    family: the Triton kernels' module, or None for ops without Triton kernels, whose launch then
        gets None as its module and runs on the tensors' device with PyTorch ops.
    cpp_launch: the same for the C++ kernels only, where they differ from launch.
    triton_fits: triton_fits(*args) says whether the Triton kernels take these arguments (e.g.
        rows_up_to(1024)); where it is False the reference runs instead (None: always).
    """
    triton_launch = _launcher(launch)
    cpp_launch = _launcher(launch if cpp_launch is None else cpp_launch)

    def fast_path(first) -> bool:
        return not (isinstance(first, torch.Tensor) and first.dtype == torch.float64)

    def triton_or_reference(*args):
        if fast_path(args[0]) and (triton_fits is None or triton_fits(*args)):
            return triton_launch(triton_module(family) if family else None, *args)
        return reference(*args)

    def cpu_kernel(*args):
        backend = _state["cpu"] if fast_path(args[0]) else "reference"
        if backend == "triton":
            return triton_or_reference(*args)
        ext = cpp_extension() if backend == "cpp" else None
        return reference(*args) if ext is None else cpp_launch(ext, *args)

    op.register_kernel("cpu", cpu_kernel)
    op.register_kernel("cuda", triton_or_reference)
