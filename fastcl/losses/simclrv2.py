"""SimCLR v2's NT-Xent with a memory of extra negatives (Chen et al. 2020b, after MoCo): the 2N
in-batch anchors of NT-Xent also contrast against K buffered embeddings of a momentum network.

    loss_a = -log( exp(s_a,p(a)) / (sum_{b != a} exp(s_ab) + sum_j exp(u_a . m_j / tau)) )

with s_ab = u_a . u_b / tau over the 2N normalized embeddings u = [n(z1), n(z2)], p(a) the other
view of a, and m (K, D) the memory rows (used as given, no gradient). The in-batch part comes
from fastcl.nt_xent's fused op, the memory part from the fused bank_lse op (the memory is read
in place, never copied); the two log-sum-exps are combined per anchor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl import _checks
from fastcl.losses.contrastive import (
    Gather, PairLoss, Temperature, _embed, _reduce, _row_dot, nt_xent,
)
from fastcl.ops.contrastive import bank_lse


def nt_xent_memory(z1: Tensor, z2: Tensor, memory: Optional[Tensor],
                   temperature: Temperature = 0.5, *, normalize: bool = True,
                   reduction: str = "mean", gather: Gather = False) -> Tensor:
    """NT-Xent over the 2N anchors of z1, z2 (N, D) with the K rows of memory (K, D) as extra
    negatives of every anchor; memory=None is plain :func:`fastcl.nt_xent`.

    gather=True or "ring": the in-batch negatives come from every rank (as nt_xent); the memory
    should then hold every rank's keys (enqueue them gathered). reduction="none" gives the (2N,)
    per-anchor losses, [view 1 anchors, view 2 anchors].
    """
    if memory is None:
        return nt_xent(z1, z2, temperature, normalize=normalize, reduction=reduction,
                       gather=gather)
    _checks.reduction(reduction)
    in_batch = nt_xent(z1, z2, temperature, normalize=normalize, reduction="none",
                       gather=gather)  # lse_batch - positive
    _checks.embeddings("memory", memory)
    _checks.same_device(z1=z1, memory=memory)
    if memory.shape[1] != z1.shape[1]:
        raise ValueError(f"memory must have shape (K, D) with D = {z1.shape[1]} as z1, got "
                         f"{tuple(memory.shape)}")
    scale = _checks.inverse_temperature(temperature, z1)
    u1, u2 = _embed(z1, normalize), _embed(z2, normalize)
    positive = _row_dot(u1, u2).repeat(2) * scale
    u = torch.cat([u1, u2])
    memory_lse = bank_lse(u.to(memory.dtype), memory.detach(), scale)[0]
    # log(exp(lse_batch) + exp(lse_memory)) - positive, without the ~1/T terms' cancellation.
    losses = torch.logaddexp(in_batch, memory_lse.to(positive.dtype) - positive)
    return _reduce(losses, reduction)


class NTXentMemoryLoss(PairLoss):
    """Module form of :func:`nt_xent_memory`: ``loss = NTXentMemoryLoss(0.5)(z1, z2, memory)``."""

    def __init__(self, temperature: Temperature = 0.5, **options):
        super().__init__(temperature, **options)  # normalize, reduction, gather

    def forward(self, z1: Tensor, z2: Tensor, memory: Optional[Tensor] = None) -> Tensor:
        return nt_xent_memory(z1, z2, memory, self.temperature, normalize=self.normalize,
                              reduction=self.reduction, gather=self.gather)
