"""Losses over negatives sampled from a memory bank (InstDisc, CMC): the full-softmax cross-entropy
over K + 1 sampled rows and InstDisc's NCE, as functions and as ``InstDiscNCELoss``, the module that
estimates NCE's normalization constant Z on its first batch.

    rows = memory.sample(batch_indices, 4096)                    # (B, K + 1), column 0 positive
    loss = fastcl.sampled_info_nce(f, memory.tensor, rows, 0.07)  # softmax CE over K + 1 rows
    loss = fastcl.InstDiscNCELoss(len(dataset))(f, memory.tensor, rows)   # InstDisc's NCE

The sampled rows are gathered inside the dot products of the fused op fastcl.ops.bank.sampled_lse,
never copied out: one pass forward, one backward. The bank gets no gradient. The banks themselves
(fastcl.MemoryBank, fastcl.Queue) are in fastcl/memory.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastcl import _checks
from fastcl.losses.contrastive import _embed, _reduce
from fastcl.ops.bank import sampled_lse


def _sampled_inputs(features, bank, indices, temperature, normalize):
    """Checks; -> (f (B, D) for the op, the detached bank, scale () float32 (float64 for float64
    inputs))."""
    _checks.embeddings("features", features)
    _checks.embeddings("bank", bank)
    if bank.shape[1] != features.shape[1]:
        raise ValueError(f"bank must have shape (N, D) with D = {features.shape[1]} as features, "
                         f"got {tuple(bank.shape)}")
    _checks.same_device(features=features, bank=bank)
    _checks.indices("indices", indices, (features.shape[0], None), bank.shape[0], bank.device)
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
        self.num_items = _checks.count("num_items", num_items)
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
                acc = torch.promote_types(lse.dtype, torch.float32)
                log_z = (torch.logsumexp(lse.to(acc), 0) - math.log(indices.numel())
                         + math.log(self.num_items))
                self.z.copy_(log_z.exp())
            self._z_frozen = True
        log_z = self.z.log().to(scale.dtype)
        return _nce_from(f, bank, indices, scale, log_z, self.reduction)

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, temperature={self.temperature}"
