"""Momentum (EMA) op family: the target-network update of MoCo, BYOL, DINO, MoCo v3 and their kin.

    target <- momentum * target + (1 - momentum) * online       for every parameter (and buffer)

``fastcl.momentum_update`` updates a whole model in a few kernel launches: the tensor pairs are
grouped by (device, target dtype, online dtype) and each group is one call of

* ``fastcl::momentum_update_(Tensor(a!)[] target, Tensor[] online, Tensor momentum) -> ()``

which reads every online tensor once in its own dtype, computes in float32 and writes the target in
its dtype: 12 bytes of memory traffic per float32 parameter (the MoCo / DINO loop over parameters
moves 28 and launches about 3 kernels per tensor). The momentum is a 0-dim tensor on the targets'
device, read by the kernel, so a schedule changes it without a host sync and a CUDA graph can
capture the step. Integer buffers (BatchNorm's num_batches_tracked) are copied, one foreach copy
per device.

Backends: the dispatcher picks the device's kernel (``register_backends``), which runs each group
on the C++ kernel of csrc/momentum.cpp on CPU (one OpenMP loop over the (tensor, chunk) pieces of
the whole group) or the Triton kernel of kernels/momentum.py on CUDA (one launch over a cached
table of chunk offsets); groups with a float64 tensor, and any other device (the op's body), run
``momentum_update_ref``. Kernels see pairs of one shape and one dense layout (channels_last
included); other layouts go through a dense copy first.

Distributed training: nothing to communicate. Each rank holds identical copies of both networks
(DDP keeps the online one in sync) and updates its own target copy, as in MoCo's and DINO's code.
"""
from __future__ import annotations

import math
from collections import defaultdict
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from fastcl import _checks
from fastcl._checks import FLOAT_DTYPES
from fastcl._backend import accumulation_dtype, register_backends


# ----------------------------------------------------------------------------------------------
# Reference: plain PyTorch, one tensor at a time. The truth in tests.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def momentum_update_ref(target: list[Tensor], online: list[Tensor], momentum: Tensor) -> None:
    """target[i] <- momentum * target[i] + (1 - momentum) * online[i], in place, computed in
    float32 (float64 when either tensor is float64) and rounded to target[i]'s dtype.

    target, online: lists of tensors of matching shapes; momentum: a 0-dim floating tensor.
    1 - momentum is computed in float64 before it is rounded, as the kernels do.
    """
    momentum = momentum.to(torch.float64)
    for t, o in zip(target, online):
        acc = accumulation_dtype(t, o)
        keep, take = momentum.to(t.device, acc), (1 - momentum).to(t.device, acc)
        t.copy_(keep * t.to(acc) + take * o.to(acc))


# ----------------------------------------------------------------------------------------------
# fastcl::momentum_update_
# ----------------------------------------------------------------------------------------------
def _is_dense(t: Tensor) -> bool:
    """Whether t's elements fill a block of memory exactly once, in some order of its dims
    (contiguous, channels_last, transposed, ...)."""
    span = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1),
                               key=lambda size_stride: size_stride[1]):
        if stride != span:
            return False
        span *= size
    return True


def _dense_pair(t: Tensor, o: Tensor) -> tuple[Tensor, Tensor]:
    """(target to update, online with its exact layout): the tensors themselves when target is
    dense and online is laid out like it, else dense copies (the caller writes target back)."""
    work = t if _is_dense(t) else t.contiguous()
    if o.stride() != work.stride():
        o = torch.empty_like(work, dtype=o.dtype).copy_(o)  # empty_like keeps work's strides
    return work, o


def _momentum_update_launch(kernels, target: list[Tensor], online: list[Tensor],
                            momentum: Tensor) -> None:
    """The op on `kernels` (fastcl._C or fastcl.kernels.momentum): one launch per (target dtype,
    online dtype) group of pairs of one dense layout; groups with a float64 tensor run the
    reference."""
    groups = {}  # (target, online dtype) -> (targets, onlines, write-backs)
    for t, o in zip(target, online):
        work = t
        if not (t.is_contiguous() and o.is_contiguous()):  # the common case, checked in C++
            work, o = _dense_pair(t, o)
        group = groups.get((t.dtype, o.dtype))
        if group is None:
            group = groups[(t.dtype, o.dtype)] = ([], [], [])
        group[0].append(work)
        group[1].append(o)
        if work is not t:
            group[2].append((t, work))
    for (t_dtype, o_dtype), (targets, onlines, write_backs) in groups.items():
        if torch.float64 in (t_dtype, o_dtype):
            momentum_update_ref(targets, onlines, momentum)
        else:
            kernels.momentum_update_(targets, onlines, momentum)
        for t, work in write_backs:
            t.copy_(work)


@torch.library.custom_op("fastcl::momentum_update_", mutates_args=("target",))
def _momentum_update_(target: list[Tensor], online: list[Tensor], momentum: Tensor) -> None:
    """target[i] <- momentum * target[i] + (1 - momentum) * online[i], in place. All tensors on
    one device (momentum too, 0-dim); any mix of floating dtypes; target[i] must not overlap."""
    momentum_update_ref(target, online, momentum)


register_backends(_momentum_update_, "momentum", momentum_update_ref, _momentum_update_launch)


@_momentum_update_.register_fake
def _(target, online, momentum):
    return None


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
def _name(side: str, label: tuple) -> str:
    """How errors name one tensor: label is (None, index) for sequences, (kind, name) for
    modules. Built only for an error: the checks run for every tensor of a model."""
    kind, key = label
    return f"{side}[{key}]" if kind is None else f"{side} {kind} {key!r}"


def _labelled_pairs(target, online, buffers: bool):
    """-> (updated, copied): lists of (label, target, online) to update, and the integer buffers
    to copy. Raises naming the first mismatch of the structures."""
    if isinstance(target, nn.Module) and isinstance(online, nn.Module):
        updated, copied = [], []
        kinds = [("parameter", nn.Module.named_parameters)]
        if buffers:
            kinds.append(("buffer", nn.Module.named_buffers))
        for kind, named in kinds:
            t_named, o_named = dict(named(target)), dict(named(online))
            if t_named.keys() != o_named.keys():
                only_t = [n for n in t_named if n not in o_named]
                only_o = [n for n in o_named if n not in t_named]
                raise ValueError(f"target and online must have the same {kind}s, got {kind}s "
                                 f"only in target: {only_t}, only in online: {only_o}")
            for name, t in t_named.items():
                copy = kind == "buffer" and not t.is_floating_point()
                (copied if copy else updated).append(((kind, name), t, o_named[name]))
        return updated, copied
    if isinstance(target, nn.Module) or isinstance(online, nn.Module):
        raise TypeError(f"target and online must both be nn.Modules or both sequences of "
                        f"tensors, got {type(target).__name__} and {type(online).__name__}")
    if buffers:
        raise ValueError("buffers=True applies to nn.Module arguments; with sequences, put the "
                         "buffers in the sequences")
    for name, seq in (("target", target), ("online", online)):
        if isinstance(seq, (Tensor, str)) or not hasattr(seq, "__iter__"):
            raise TypeError(f"{name} must be an nn.Module or a sequence of tensors, got "
                            f"{type(seq).__name__}")
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"target and online must have as many tensors, got {len(target)} and "
                         f"{len(online)}")
    return [((None, i), t, o) for i, (t, o) in enumerate(zip(target, online))], []


def _check_pair(label: tuple, t, o, copy: bool) -> None:
    if not (isinstance(t, Tensor) and isinstance(o, Tensor)):
        side, x = ("target", t) if not isinstance(t, Tensor) else ("online", o)
        raise TypeError(f"{_name(side, label)} must be a torch.Tensor, got {type(x).__name__}")
    if copy:  # an integer buffer: copied, so online must not hold fractions
        if o.is_floating_point() or o.is_complex():
            raise TypeError(f"{_name('online', label)} must be an integer tensor like "
                            f"{_name('target', label)} ({t.dtype}), got {o.dtype}")
    elif t.dtype not in FLOAT_DTYPES or o.dtype not in FLOAT_DTYPES:
        side, x = ("target", t) if t.dtype not in FLOAT_DTYPES else ("online", o)
        raise TypeError(f"{_name(side, label)} must be float32, bfloat16, float16 or float64, "
                        f"got {x.dtype}")
    if t.shape != o.shape:
        raise ValueError(f"{_name('target', label)} and {_name('online', label)} must have the "
                         f"same shape, got {tuple(t.shape)} and {tuple(o.shape)}")
    if t.device != o.device:
        raise ValueError(f"{_name('target', label)} and {_name('online', label)} must be on the "
                         f"same device, got {t.device} and {o.device}")


def _check_momentum(momentum) -> None:
    """A float in [0, 1], or a 0-dim floating tensor (whose value is not read: no host sync)."""
    if isinstance(momentum, Tensor):
        if momentum.dim() != 0:
            raise ValueError(f"momentum must be a float or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(momentum.shape)}")
        if not momentum.is_floating_point():
            raise TypeError(f"momentum must be a floating tensor, got {momentum.dtype}")
        return
    if isinstance(momentum, bool) or not isinstance(momentum, Real):
        raise TypeError(f"momentum must be a float or a 0-dim tensor, got "
                        f"{type(momentum).__name__}")
    _checks.unit_interval("momentum", momentum)


def _momentum_on(momentum, device: torch.device, where: str) -> Tensor:
    """momentum as the 0-dim tensor the op reads on `device` (float64 for a float: exact 1 - m)."""
    if not isinstance(momentum, Tensor):
        return torch.full((), float(momentum), dtype=torch.float64, device=device)
    if momentum.device != device:
        raise ValueError(f"momentum must be on the device of the targets, got momentum on "
                         f"{momentum.device} and {where} on {device}")
    return momentum.detach()


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def momentum_update(target, online, momentum, *, buffers: bool = False) -> None:
    """In place: target <- momentum * target + (1 - momentum) * online, for a whole model.

    target, online: two nn.Modules of the same architecture (parameters matched by name), or two
    sequences of tensors matched by position (shapes equal, one device per pair). Targets may be
    float32, bfloat16, float16 or float64 and online tensors any of these, independently (an fp32
    teacher of a bf16 student is read in bf16 and written in fp32); the update is computed in
    float32 (float64 if either is float64). Any layout works; dense ones (contiguous,
    channels_last) are updated where they are, when target and online share it.

    buffers=True (modules only) also updates the floating buffers (BatchNorm's running mean and
    variance) and copies the integer ones (num_batches_tracked), as DINO's and BYOL's teachers
    need when their BN statistics are not recomputed.

    momentum: a float in [0, 1] (0 copies online into target, 1 leaves target as it is), or a 0-dim
    floating tensor on the targets' device: its value is read by the kernel, never on the host,
    so a schedule can change it in place between steps (momentum.fill_(cosine_schedule(...)))
    under torch.compile or a CUDA graph (capture after one eager step: the first call for a set
    of CUDA tensors uploads their table of chunk offsets). A tensor's value is not checked.

    Runs under torch.no_grad (targets may require grad; no autograd history is recorded). A few
    launches for the whole model: one per (device, target dtype, online dtype), plus one copy of
    the integer buffers per device. Target tensors must not overlap one another. Distributed
    training needs nothing: each rank updates its own copy of the target network.
    """
    _check_momentum(momentum)
    if not isinstance(buffers, bool):
        raise TypeError(f"buffers must be a bool, got {type(buffers).__name__}")
    updated, copied = _labelled_pairs(target, online, buffers)
    by_device, first_label = defaultdict(lambda: ([], [])), {}
    for label, t, o in updated:
        _check_pair(label, t, o, copy=False)
        targets, onlines = by_device[t.device]
        if not targets:
            first_label[t.device] = label
        targets.append(t)
        onlines.append(o)
    copies = defaultdict(lambda: ([], []))
    for label, t, o in copied:
        _check_pair(label, t, o, copy=True)
        copies[t.device][0].append(t)
        copies[t.device][1].append(o)
    momenta = {device: _momentum_on(momentum, device, _name("target", first_label[device]))
               for device in by_device}
    with torch.no_grad():
        for device, (targets, onlines) in by_device.items():
            _momentum_update_(targets, onlines, momenta[device])
        for targets, onlines in copies.values():
            torch._foreach_copy_(targets, onlines)


def cosine_schedule(step, total_steps, start: float, end: float) -> float:
    """The cosine schedule of BYOL, DINO and MoCo v3 at `step` of `total_steps`:

        value = end - (end - start) * (1 + cos(pi * step / total_steps)) / 2

    start at step 0, end at step total_steps. BYOL / DINO momentum: start 0.996, end 1. MoCo v3's
    m = 1 - (1 + cos(pi t / T)) / 2 * (1 - m0) is start = m0, end = 1.

    step: an int (or float) in [0, total_steps]; total_steps: an int >= 1; start, end: finite
    numbers. Returns a Python float.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, Integral):
        raise TypeError(f"total_steps must be an int, got {type(total_steps).__name__}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if isinstance(step, bool) or not isinstance(step, Real):
        raise TypeError(f"step must be an int or a float, got {type(step).__name__}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps] = [0, {total_steps}], got {step}")
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    return end - (end - start) * (1 + math.cos(math.pi * step / total_steps)) / 2
