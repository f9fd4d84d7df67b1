"""Argument checks shared by the functional API: each error names the argument and what was expected,
and fires before any kernel runs."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch
from torch import Tensor

from fastcl._backend import accumulation_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def embeddings(name: str, x, ndim: int = 2) -> Tensor:
    """x must be a non-empty floating tensor with `ndim` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def paired_embeddings(**pair: Tensor) -> None:
    """Two (N, D) embeddings of the same shape, device and dtype (views, or query and key)."""
    (name_a, a), (name_b, b) = pair.items()
    embeddings(name_a, a)
    embeddings(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape (N, D), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    same_device(**pair)
    same_dtype(**pair)


def same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on the same device, got {listed}")


def same_dtype(**tensors: Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n} is {d}" for n, d in dtypes.items())
        raise TypeError(f"tensors must have the same dtype, got {listed}")


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def positive_scalar(name: str, value, *, tensor: bool = True, positive: bool = True
                    ) -> Optional[float]:
    """A float, or a 0-dim floating tensor; its value is checked (and returned) unless that would
    cost a host sync (a CUDA tensor) or a graph break (under torch.compile): None then.
    tensor=False: a Python number only (a fixed value that gets no gradient), returned as a float.
    positive=False: any finite value (a bias)."""
    if isinstance(value, Tensor) and tensor:
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a 0-dim floating tensor, got {value.dtype} "
                            f"tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        value = float(value.detach())
    elif isinstance(value, bool) or not isinstance(value, Real):
        expected = "a float or a 0-dim tensor" if tensor else "a float (fixed: no gradient)"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if not (math.isfinite(value) and (value > 0 or not positive)):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return float(value)


def unit_interval(name: str, value) -> float:
    """A float in [0, 1] (momenta), returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def inverse_temperature(temperature, like: Tensor, name: str = "temperature", *,
                        tensor: bool = True) -> Tensor:
    """scale = 1 / temperature as a 0-dim tensor on like's device, in like's accumulation dtype
    (float32; float64 for float64 inputs, so that they stay float64-exact), differentiable in a
    tensor temperature. A CPU temperature tensor may drive inputs on any device.
    tensor=False: temperature must be a Python float (a fixed one, see positive_scalar)."""
    value = positive_scalar(name, temperature, tensor=tensor)
    largest = torch.finfo(accumulation_dtype(like)).max
    if value is not None and 1.0 / value > largest:
        raise ValueError(f"{name} must be >= {1.0 / largest:.3g} so that 1 / {name} is finite in "
                         f"{accumulation_dtype(like)}, got {value:g}")
    if isinstance(temperature, Tensor):
        return 1.0 / scalar_tensor(name, temperature, like)
    return scalar_tensor(name, 1.0 / value, like)


def scalar_tensor(name: str, value, like: Tensor, *, positive: bool = True) -> Tensor:
    """value (a float or a 0-dim floating tensor, checked as positive_scalar does) as a 0-dim tensor
    on like's device in like's accumulation dtype, differentiable in a tensor value. A CPU tensor
    may drive inputs on any device. A float must be finite in that dtype."""
    checked = positive_scalar(name, value, positive=positive)
    acc = accumulation_dtype(like)
    if isinstance(value, Tensor):
        if value.device.type != "cpu" and value.device != like.device:
            raise ValueError(f"{name} must be on the inputs' device ({like.device}) or the CPU, "
                             f"got {value.device}")
        return value.to(device=like.device, dtype=acc)
    if abs(checked) > torch.finfo(acc).max:
        raise ValueError(f"{name} must be finite in {acc}, got {checked:g}")
    return torch.full((), checked, dtype=acc, device=like.device)


def count(name: str, value, minimum: int = 1) -> int:
    """An int >= minimum (sizes, dimensions, numbers of rows), returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def indices(name: str, value, shape: tuple, num_items: int, device) -> Tensor:
    """value: an int64 tensor of `shape` (None: any size) on `device`, entries in [0, num_items)
    (rows of a memory bank).

    Entries are checked on CPU tensors (a ValueError); on other devices by a device-side assert
    (no host sync: a failure surfaces as a RuntimeError at the next sync); not under torch.compile.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {value.dtype}")
    if value.dim() != len(shape) or any(s is not None and s != n
                                        for s, n in zip(shape, value.shape)):
        wanted = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({wanted}), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on the bank's device {device}, got {value.device}")
    if torch.compiler.is_compiling() or value.numel() == 0:
        return value
    if value.device.type == "cpu":
        low, high = int(value.min()), int(value.max())
        if low < 0 or high >= num_items:
            raise ValueError(f"{name} must lie in [0, {num_items}), got values in "
                             f"[{low}, {high}]")
    else:
        torch._assert_async(((value >= 0) & (value < num_items)).all(),
                            f"{name} must lie in [0, {num_items})")
    return value
