"""torch.distributed helpers used by the losses' ``gather=True`` mode."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# How a trainer's losses see every rank's embeddings (fastcl train --gather): all-gathered
# (gather=True) or passed around the ranks (gather="ring", fastcl/ring.py).
GATHERS = ("all", "ring")


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """Concatenate x (N, ...) from every rank in rank order -> (W * N, ...).

    Backward sums the incoming gradients over ranks and returns this rank's rows: every rank's
    loss depends on every rank's rows, so each row's gradient is the sum over all the losses
    (the bug lightly and solo-learn once shipped was to keep only the local term).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """x (N, ...) from every rank, concatenated in rank order; gradients flow back to each rank.

    With W ranks of N rows each, a loss averaged over local anchors and then averaged over ranks
    (as DistributedDataParallel does with gradients) equals the single-process loss over W * N
    rows, gradients included. Every rank must pass the same N.
    """
    if world()[1] == 1:
        return x
    return _AllGather.apply(x)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """x (N, ...) from every rank, concatenated in rank order, without autograd (labels)."""
    size = world()[1]
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
