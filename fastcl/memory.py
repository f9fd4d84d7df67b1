"""Stateful negatives: MoCo's queue and InstDisc's and CMC's memory bank.

    queue = fastcl.Queue(65536, 128)                      # MoCo: (size, dim) rows, random unit
    loss = fastcl.info_nce(q, k, queue.tensor, 0.2)        # the rows read in place, no copy
    queue.enqueue(k, gather=True)                          # ring write, pointer on the device

    memory = fastcl.MemoryBank(len(dataset), 128)          # InstDisc / CMC: one row per image
    indices = memory.sample(batch_indices, 4096)           # (B, K + 1), column 0 the anchor's row
    loss = fastcl.sampled_info_nce(f, memory.tensor, indices, 0.07)   # softmax CE over K + 1
    memory.update(batch_indices, f)                        # v <- n(0.5 v + 0.5 f)

State (contents, pointers, fill counts) lives in buffers: it moves with .to() and is saved and
restored with state_dict. Nothing here syncs with the device except the documented Python-int
accessors (len(queue)) and the checks of index values on CPU tensors. The losses over sampled
bank rows are in fastcl/losses/bank.py, the ops and their kernels in fastcl/ops/bank.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import _checks
from fastcl.distributed import all_gather_no_grad, world
from fastcl.ops.bank import bank_update_, ring_enqueue_


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    return dtype


def _random_unit_rows(rows: int, dim: int, dtype: torch.dtype, device) -> Tensor:
    return F.normalize(torch.randn(rows, dim, device=device), dim=1).to(dtype)


def _check_rows(name: str, x, rows_name: str, dim: int, device: torch.device) -> Tensor:
    """x: a (B, dim) floating tensor on `device`."""
    _checks.embeddings(name, x)
    if x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}) to match the {rows_name}, got "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the {rows_name}'s device {device}, got {x.device}")
    return x


# ----------------------------------------------------------------------------------------------
# MoCo queue
# ----------------------------------------------------------------------------------------------
class Queue(nn.Module):
    """MoCo's queue of negatives: a ring of `size` rows of `dim` features.

    Layout: ``queue.tensor`` is the (size, dim) buffer itself, rows = keys, the (K, D) bank that
    ``fastcl.info_nce(q, k, negatives=queue.tensor)`` reads in place (MoCo's code keeps the
    transpose, (dim, K)). It starts as random unit rows, as MoCo v1 initializes it, and every row
    is used as a negative from the first step, as in MoCo.

    State, in buffers (saved and restored with state_dict, moved with .to()):
      contents (size, dim) in `dtype`; pointer () int64, the next row to write;
      count () int64, the number of rows written by enqueue so far, saturating at size.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.size = _checks.count("size", size)
        self.dim = _checks.count("dim", dim)
        self.register_buffer("contents", _random_unit_rows(size, dim, _check_dtype(dtype), device))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def tensor(self) -> Tensor:
        """The (size, dim) contents, not a copy: pass it as negatives, never write to it."""
        return self.contents

    def __len__(self) -> int:
        """Rows written by enqueue so far (at most size), as a Python int: SYNCS with the device.
        ``queue.count`` is the same number as a device tensor, without a sync."""
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, *, gather: bool = False) -> None:
        """Writes keys (B, dim) at the pointer, wrapping around the end; any B <= size.

        keys are detached and cast into the queue's dtype. gather=True (under torch.distributed)
        first all-gathers the keys of every rank in rank order (every rank must pass the same B),
        so every rank holds the same queue. No host sync: the pointer stays on the device.
        """
        _check_rows("keys", keys, "queue", self.dim, self.contents.device)
        keys = keys.detach()
        if gather:
            keys = all_gather_no_grad(keys)
        if keys.shape[0] > self.size:
            ranks = f" (gathered from {world()[1]} ranks)" if gather else ""
            raise ValueError(f"keys must have at most size = {self.size} rows, got "
                             f"{keys.shape[0]}{ranks}")
        ring_enqueue_(self.contents, self.pointer, self.count, keys)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.contents.dtype}"


# ----------------------------------------------------------------------------------------------
# InstDisc / CMC memory bank
# ----------------------------------------------------------------------------------------------
class MemoryBank(nn.Module):
    """InstDisc's memory bank (and each of CMC's two): one `dim`-row per training item.

    ``memory.tensor`` is the (num_items, dim) buffer ``memory`` (random unit rows at first, saved
    with state_dict); pass it as the bank of fastcl.sampled_info_nce / fastcl.InstDiscNCELoss.
    """

    def __init__(self, num_items: int, dim: int, momentum: float = 0.5,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_items = _checks.count("num_items", num_items)
        self.dim = _checks.count("dim", dim)
        self.momentum = _checks.unit_interval("momentum", momentum)
        self.register_buffer("memory",
                             _random_unit_rows(num_items, dim, _check_dtype(dtype), device))

    @property
    def tensor(self) -> Tensor:
        """The (num_items, dim) rows, not a copy."""
        return self.memory

    @torch.no_grad()
    def update(self, indices: Tensor, features: Tensor, *, gather: bool = False) -> None:
        """Rows indices (B,) int64 <- n(momentum v + (1 - momentum) f) for features (B, dim), in
        one kernel (fp32 math, stored in the bank's dtype; n(x) = x / max(||x||, 1e-12)).

        Duplicate indices: the last occurrence in the batch wins (with gather=True, the last in
        rank order), from the row's value before this update; as InstDisc's index_copy_ on CPU.
        gather=True all-gathers indices and features from every rank first (same B on every
        rank), so every rank applies the same update. features are detached.
        """
        _check_rows("features", features, "memory bank", self.dim, self.memory.device)
        _checks.indices("indices", indices, (features.shape[0],), self.num_items,
                       self.memory.device)
        features = features.detach()
        if gather:
            indices, features = all_gather_no_grad(indices), all_gather_no_grad(features)
        bank_update_(self.memory, indices, features, self.momentum)

    def sample(self, indices: Tensor, num_negatives: int,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """(B, num_negatives + 1) int64 bank rows for anchors indices (B,): column 0 is the
        anchor's own row, the others are drawn uniformly with replacement (InstDisc)."""
        _checks.indices("indices", indices, (None,), self.num_items, self.memory.device)
        k = _checks.count("num_negatives", num_negatives)
        negatives = torch.randint(0, self.num_items, (indices.shape[0], k), generator=generator,
                                  device=indices.device)
        return torch.cat([indices[:, None], negatives], dim=1)

    def extra_repr(self) -> str:
        return (f"num_items={self.num_items}, dim={self.dim}, momentum={self.momentum}, "
                f"dtype={self.memory.dtype}")
