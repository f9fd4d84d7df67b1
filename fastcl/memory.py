"""Stateful negatives: MoCo's queue, InstDisc's and CMC's memory bank, and the losses over negatives
sampled from a bank (InstDisc's NCE and its full-softmax variant).

    queue = fastcl.Queue(65536, 128)                      # MoCo: (size, dim) rows, random unit
    loss = fastcl.info_nce(q, k, queue.tensor, 0.2)        # the rows read in place, no copy
    queue.enqueue(k, gather=True)                          # ring write, pointer on the device

    memory = fastcl.MemoryBank(len(dataset), 128)          # InstDisc / CMC: one row per image
    indices = memory.sample(batch_indices, 4096)           # (B, K + 1), column 0 the anchor's row
    loss = fastcl.sampled_info_nce(f, memory.tensor, indices, 0.07)   # softmax CE over K + 1
    loss = nce(f, memory.tensor, indices)                  # nce = fastcl.InstDiscNCELoss(len(dataset))
    memory.update(batch_indices, f)                        # v <- n(0.5 v + 0.5 f)

State (contents, pointers, fill counts, InstDisc's Z) lives in buffers: it moves with .to() and is
saved and restored with state_dict. Nothing here syncs with the device except the documented
Python-int accessors (len(queue)) and the checks of index values on CPU tensors.
The ops and their kernels are in fastcl/ops/bank.py.
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import _checks
from fastcl.distributed import all_gather_no_grad, world
from fastcl.losses.contrastive import _embed, _reduce
from fastcl.ops.bank import bank_update_, ring_enqueue_, sampled_lse


def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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


def _check_indices(name: str, indices, shape: tuple, num_items: int, device) -> Tensor:
    """indices: an int64 tensor of `shape` (None: any size) on `device`, values in [0, num_items).

    Values are checked on CPU tensors (a ValueError); on other devices by a device-side assert
    (no host sync: a failure surfaces as a RuntimeError at the next sync); not under torch.compile.
    """
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {indices.dtype}")
    if indices.dim() != len(shape) or any(s is not None and s != n
                                          for s, n in zip(shape, indices.shape)):
        wanted = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({wanted}), got {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"{name} must be on the bank's device {device}, got {indices.device}")
    if torch.compiler.is_compiling() or indices.numel() == 0:
        return indices
    if indices.device.type == "cpu":
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_items:
            raise ValueError(f"{name} must lie in [0, {num_items}), got values in "
                             f"[{low}, {high}]")
    else:
        torch._assert_async(((indices >= 0) & (indices < num_items)).all(),
                            f"{name} must lie in [0, {num_items})")
    return indices


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
        self.size = _check_count("size", size)
        self.dim = _check_count("dim", dim)
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
    with state_dict); pass it as the bank of :func:`sampled_info_nce` / :class:`InstDiscNCELoss`.
    """

    def __init__(self, num_items: int, dim: int, momentum: float = 0.5,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_items = _check_count("num_items", num_items)
        self.dim = _check_count("dim", dim)
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
        _check_indices("indices", indices, (features.shape[0],), self.num_items,
                       self.memory.device)
        features = features.detach()
        if gather:
            indices, features = all_gather_no_grad(indices), all_gather_no_grad(features)
        bank_update_(self.memory, indices, features, self.momentum)

    def sample(self, indices: Tensor, num_negatives: int,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """(B, num_negatives + 1) int64 bank rows for anchors indices (B,): column 0 is the
        anchor's own row, the others are drawn uniformly with replacement (InstDisc)."""
        _check_indices("indices", indices, (None,), self.num_items, self.memory.device)
        k = _check_count("num_negatives", num_negatives)
        negatives = torch.randint(0, self.num_items, (indices.shape[0], k), generator=generator,
                                  device=indices.device)
        return torch.cat([indices[:, None], negatives], dim=1)

    def extra_repr(self) -> str:
        return (f"num_items={self.num_items}, dim={self.dim}, momentum={self.momentum}, "
                f"dtype={self.memory.dtype}")


# ----------------------------------------------------------------------------------------------
# Losses over sampled bank rows
# ----------------------------------------------------------------------------------------------
def _sampled_inputs(features, bank, indices, temperature, normalize):
    """Checks; -> (f (B, D) for the op, the detached bank, scale () float32 (float64 for float64
    inputs))."""
    _checks.embeddings("features", features)
    _checks.embeddings("bank", bank)
    if bank.shape[1] != features.shape[1]:
        raise ValueError(f"bank must have shape (N, D) with D = {features.shape[1]} as features, "
                         f"got {tuple(bank.shape)}")
    _checks.same_device(features=features, bank=bank)
    _check_indices("indices", indices, (features.shape[0], None), bank.shape[0], bank.device)
    if indices.shape[1] < 2:
        raise ValueError(f"indices must have shape (B, K + 1) with K >= 1 negatives, got "
                         f"{tuple(indices.shape)}")
    f = _embed(features, normalize)
    if bank.dtype == torch.float64:
        f = f.double()  # the reference then runs in float64
    # float32 for the kernels; float64 inputs run the reference in float64 throughout. The
    # temperature is fixed (tensor=False): the sampled losses give it no gradient.
    return f, bank.detach(), _checks.inverse_temperature(temperature, f, tensor=False)


def sampled_info_nce(features: Tensor, bank: Tensor, indices: Tensor,
                     temperature: float = 0.07, *, normalize: bool = True,
                     reduction: str = "mean") -> Tensor:
    """Softmax CE over sampled bank rows: InstDisc's full-softmax variant, CMC's softmax form.

    features (B, D) (L2-normalized here unless normalize=False), bank (N, D) read in place (no
    gradient), indices (B, K + 1) int64 with column 0 each anchor's positive row: per anchor,
    CE over the logits [f . bank[indices_b0], ..., f . bank[indices_bK]] / temperature with
    label 0. The gathered rows are never materialized (one fused pass forward, one backward).
    temperature is fixed (no gradient). reduction="none" gives (B,) losses.
    """
    _checks.reduction(reduction)
    f, bank, scale = _sampled_inputs(features, bank, indices, temperature, normalize)
    positive, lse, _ = sampled_lse(f, bank, indices, scale, torch.zeros_like(scale))
    return _reduce(lse - positive, reduction)


def _nce_shift(log_z: Tensor, num_negatives: int, num_items: int) -> Tensor:
    """log(Z K / n): InstDisc's NCE compares P_j = exp(s_j) / Z with the noise mass K / n."""
    return log_z + math.log(num_negatives / num_items)


def sampled_nce(features: Tensor, bank: Tensor, indices: Tensor, z, temperature: float = 0.07,
                *, normalize: bool = True, reduction: str = "mean") -> Tensor:
    """InstDisc's NCE loss with a given normalization constant z (a float or 0-dim tensor > 0).

    With P_j = exp(f . bank[indices_bj] / temperature) / z, K = indices.shape[1] - 1 noise
    samples and n = N bank rows (the dataset size):
    loss_b = -log(P_0 / (P_0 + K / n)) - sum_{j >= 1} log((K / n) / (P_j + K / n)),
    averaged over the B anchors (reduction="mean", InstDisc's L). Arguments as in
    :func:`sampled_info_nce`; z and temperature get no gradient. :class:`InstDiscNCELoss`
    estimates z on its first batch as InstDisc does.
    """
    _checks.reduction(reduction)
    _checks.positive_scalar("z", z)
    f, bank, scale = _sampled_inputs(features, bank, indices, temperature, normalize)
    log_z = torch.as_tensor(z, dtype=scale.dtype, device=bank.device).detach().log()
    return _nce_from(f, bank, indices, scale, log_z, reduction)


def _nce_from(f, bank, indices, scale, log_z, reduction):
    shift = _nce_shift(log_z, indices.shape[1] - 1, bank.shape[0])
    positive, _, nce = sampled_lse(f, bank, indices, scale, shift)
    # -log h+ - sum_j log h-_j = sum_{j >= 0} softplus(s_j - shift) - (s_0 - shift).
    return _reduce(nce - (positive - shift), reduction)


class InstDiscNCELoss(nn.Module):
    """InstDisc's NCE loss (:func:`sampled_nce`) with its normalization constant Z estimated on the
    first batch, Z = mean_bj exp(f_b . bank[indices_bj] / temperature) * num_items, then frozen.

    Z is a buffer (``z``, NaN until the first batch; saved and restored with state_dict: a
    restored finite Z stays frozen). The first call computes the logits twice (once to estimate
    Z), later calls once. CMC: one module per view (each view has its own Z).
    """

    def __init__(self, num_items: int, temperature: float = 0.07, *,
                 normalize: bool = True, reduction: str = "mean"):
        super().__init__()
        self.num_items = _check_count("num_items", num_items)
        self.temperature = _checks.positive_scalar("temperature", temperature, tensor=False)
        self.normalize = normalize
        self.reduction = _checks.reduction(reduction)
        self.register_buffer("z", torch.full((), float("nan")))
        self._z_frozen = False  # a Python flag, so that forward never reads z on the host
        self.register_load_state_dict_post_hook(InstDiscNCELoss._after_load)

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        module._z_frozen = bool(torch.isfinite(module.z))  # syncs, once per load

    def forward(self, features: Tensor, bank: Tensor, indices: Tensor) -> Tensor:
        """features (B, D), bank (num_items, D), indices (B, K + 1) -> loss (see sampled_nce)."""
        if isinstance(bank, Tensor) and bank.dim() == 2 and bank.shape[0] != self.num_items:
            raise ValueError(f"bank must have num_items = {self.num_items} rows (n, the dataset "
                             f"size of the NCE noise distribution), got {bank.shape[0]}")
        f, bank, scale = _sampled_inputs(features, bank, indices, self.temperature,
                                         self.normalize)
        if not self._z_frozen:
            with torch.no_grad():
                _, lse, _ = sampled_lse(f.detach(), bank, indices, scale, torch.zeros_like(scale))
                # log(mean_bj exp(s_bj) * n) from the per-anchor log-sum-exps, overflow-free.
                log_z = (torch.logsumexp(lse.float(), 0) - math.log(indices.numel())
                         + math.log(self.num_items))
                self.z.copy_(log_z.exp())
            self._z_frozen = True
        log_z = self.z.log().to(scale.dtype)
        return _nce_from(f, bank, indices, scale, log_z, self.reduction)

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, temperature={self.temperature}"


# ----------------------------------------------------------------------------------------------
# Naive formulas, as InstDisc's code writes them: they materialize the (B, K + 1, D) gathered rows
# and keep them for backward. The truth in tests (in float64) and the baselines in benchmarks.
# ----------------------------------------------------------------------------------------------
def _sampled_logits_naive(features, bank, indices, temperature, normalize):
    f = F.normalize(features, dim=1) if normalize else features
    b, k1 = indices.shape
    rows = torch.index_select(bank, 0, indices.reshape(-1)).detach().reshape(b, k1, -1)
    return torch.bmm(rows.to(f.dtype), f[:, :, None]).squeeze(2) / temperature


def sampled_info_nce_ref(features: Tensor, bank: Tensor, indices: Tensor,
                         temperature: float = 0.07, *, normalize: bool = True,
                         reduction: str = "mean") -> Tensor:
    """index_select of B (K + 1) rows -> bmm -> cross-entropy with label 0."""
    logits = _sampled_logits_naive(features, bank, indices, temperature, normalize)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def sampled_nce_ref(features: Tensor, bank: Tensor, indices: Tensor, z,
                    temperature: float = 0.07, *, normalize: bool = True,
                    reduction: str = "mean") -> Tensor:
    """InstDisc's NCEAverage + NCECriterion: P = exp(logits) / Z, then the NCE log terms."""
    p = torch.exp(_sampled_logits_naive(features, bank, indices, temperature, normalize)) / z
    noise = (indices.shape[1] - 1) / bank.shape[0]  # K * Pn with Pn = 1 / n
    log_h_pos = torch.log(p[:, 0] / (p[:, 0] + noise))
    log_h_neg = torch.log(noise / (p[:, 1:] + noise)).sum(1)
    return _reduce(-(log_h_pos + log_h_neg), reduction)
