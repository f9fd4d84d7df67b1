"""gather="ring": a pair loss over every rank's rows, each rank holding only its own (N, D) rows.

gather=True all-gathers the keys: every rank then holds W x N rows (and their gradient). The ring
keeps each rank's anchors (M, D) and keys (N, D) in place and sends the key blocks around it
instead (rank r sends to r + 1 and receives from r - 1): at step t rank r holds the keys of rank
r - t, runs the fused op on its anchors against them while the next block is in flight, and merges
its anchors' per-row statistics [lse_neg, lse_pos, sum_pos, count] over the W steps (log-sum-exp
merge of the two lse's, sums and counts add). The loss is computed once from the merged
statistics, so it is the single-process loss over W x N rows, not an approximation; the memory per
rank is a few (N, D) blocks whatever W.

Column statistics (CLIP's key -> query direction) belong to the key block's owner. They come out
of the same tile pass as the row statistics (the fused op reads each logit once for both
directions), and an accumulator of them (4 numbers per key) travels one hop behind its block,
merged on every rank, landing at the owner after the W-th hop. (Inf-CL runs a second ring with the
roles swapped instead, which sends every block twice and computes every logit twice.)

Backward is Inf-CL's Algorithm 3 (Wang et al. 2024, "Breaking the Memory Barrier"): each rank
forms the backward coefficients of its own rows and its own keys' columns from the merged
statistics; the key blocks travel again with their column coefficients, and each rank adds its
anchors' gradient and the visiting block's key gradient (cross_contrastive_backward, which takes
the coefficients as arguments) into an accumulator (N, D) that travels one hop behind the block
and lands at its owner. A rank's rows thus get the gradient of the sum of every rank's loss, as
with gather=True. The scale gets, on each rank, the derivative of the pairs that rank visited:
every pair of the global similarity matrix is visited on exactly one rank, so the sum over ranks
(DistributedDataParallel's all-reduce) is the single-process gradient, each pair once; nothing is
reduced here. Every rank must pass the same shapes and call backward, as with any collective.

SigLIP's sigmoid loss runs the same ring with fastcl::sigmoid_pairs: its pairs are independent,
so the blocks' row losses simply add (no statistics, no column accumulator), the positives sit at
the diagonal offset (rank - owner) x N, and backward sends the text gradient accumulator around as
above; a rank's scale and bias gradients are the sums over its own pairs, its own loss's.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastcl.distributed import world
from fastcl.ops.contrastive import (
    backward_coefficients, cross_contrastive, cross_contrastive_backward, loss_from_stats,
)
from fastcl.ops.siglip import sigmoid_pairs, sigmoid_pairs_backward

# Tags keep the two streams between neighbours apart: the blocks and the accumulators behind them.
_BLOCK, _ACCUMULATOR = 0, 1


class _Ring:
    """Point-to-point shifts to the ring's next rank, from its previous one."""

    def __init__(self):
        self.rank, self.size = world()
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size

    def shift(self, tensors: tuple[Tensor, ...], tag: int) -> Callable[[], list[Tensor]]:
        """Starts sending `tensors` to the next rank and receiving tensors of the same shapes
        from the previous one; returns the function that waits for them and gives them."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        works = dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, t, self.next, tag=tag) for t in tensors]
            + [dist.P2POp(dist.irecv, t, self.prev, tag=tag) for t in received]
        )

        def wait() -> list[Tensor]:
            for work in works:
                work.wait()
            return received

        return wait


def merge_stats(a: Tensor, b: Tensor) -> Tensor:
    """Statistics (4, n) of two disjoint sets of pairs -> those of their union."""
    return torch.cat([torch.logaddexp(a[:2], b[:2]), a[2:] + b[2:]])


def _around_the_ring(block: tuple[Tensor, ...], visit, merge=torch.add) -> Optional[Tensor]:
    """Calls visit(owner, *block) on every rank's block in turn, this rank's own first, while the
    next block is in flight. visit may return this rank's share of a per-block accumulator (the
    block's column statistics, its key gradient): it travels one hop behind its block, merged
    into on every rank, and the accumulator of this rank's own block, complete, is returned
    (None when visit returns none)."""
    ring = _Ring()
    wait_block = wait_share = None
    for step in range(ring.size):
        if step + 1 < ring.size:
            wait_block = ring.shift(block, _BLOCK)
        share = visit((ring.rank - step) % ring.size, *block)
        if share is not None:
            if wait_share is not None:
                share = merge(wait_share()[0], share)
            wait_share = ring.shift((share,), _ACCUMULATOR)
        if step + 1 < ring.size:
            block = tuple(wait_block())
    return None if wait_share is None else wait_share()[0]


class _RingContrastive(torch.autograd.Function):
    """(anchors, keys, their labels, scale) -> cross_contrastive's outputs over every rank's keys
    (see the module docstring). self_pairs: anchors are the keys (a Gram matrix), their own pairs
    (i, i) are left out."""

    @staticmethod
    def forward(ctx, anchors, keys, anchor_labels, key_labels, scale, self_pairs, with_col):
        rank = world()[0]
        stats = None

        def visit(owner, block_keys, block_labels):
            nonlocal stats
            _, _, block_stats, col_stats = cross_contrastive(
                anchors, block_keys, anchor_labels, block_labels, scale,
                0 if self_pairs and owner == rank else None, with_col,
            )
            stats = block_stats if stats is None else merge_stats(stats, block_stats)
            return col_stats if with_col else None

        col_stats = _around_the_ring((keys, key_labels), visit, merge_stats)
        if col_stats is None:
            col_stats = stats.new_empty(4, 0)
        ctx.self_pairs, ctx.with_col = self_pairs, with_col
        ctx.save_for_backward(anchors, keys, anchor_labels, key_labels, scale, stats, col_stats)
        ctx.mark_non_differentiable(stats, col_stats)
        return loss_from_stats(stats), loss_from_stats(col_stats), stats, col_stats

    @staticmethod
    def backward(ctx, grad, grad_col, _grad_stats, _grad_col_stats):
        anchors, keys, anchor_labels, key_labels, scale, stats, col_stats = ctx.saved_tensors
        need_dk = ctx.needs_input_grad[1]  # the same on every rank (the same model)
        rank = world()[0]
        coef = backward_coefficients(stats, grad)
        block = (keys, key_labels)
        if ctx.with_col:  # the owner's column coefficients travel with its keys
            block += (backward_coefficients(col_stats, grad_col),)
        no_col = coef.new_empty(5, 0)
        dq = torch.zeros(anchors.shape, dtype=coef.dtype, device=anchors.device)

        def visit(owner, block_keys, block_labels, col_coef=no_col):
            dq_block, dk = cross_contrastive_backward(
                anchors, block_keys, anchor_labels, block_labels, scale,
                0 if ctx.self_pairs and owner == rank else None, coef, col_coef, need_dk,
            )
            dq.add_(dq_block)
            return dk if need_dk else None

        dk = _around_the_ring(block, visit)
        dscale = None
        if ctx.needs_input_grad[4]:
            # sum_i <dq_i, q_i> = scale * (d/dscale of the pairs visited here): linear in scale.
            dscale = ((dq * anchors.to(dq.dtype)).sum() / scale.to(dq.dtype)).to(scale.dtype)
        dq = dq.to(anchors.dtype) if ctx.needs_input_grad[0] else None
        return dq, None if dk is None else dk.to(keys.dtype), None, None, dscale, None, None


class _RingSigmoid(torch.autograd.Function):
    """(images x (N, D), texts y (N, D), scale, bias) -> SigLIP's row losses (N,) of this rank's
    images against every rank's texts; text j of rank s is image i of rank r's positive when
    s * N + j == r * N + i. Pairs are independent: the blocks' losses add, no statistics merge;
    backward sends each block's text gradient around behind it, and the scale's and bias's
    gradients are the sums over this rank's pairs (its own loss's), added over ranks by DDP."""

    @staticmethod
    def forward(ctx, x, y, scale, bias):
        rank, n = world()[0], x.shape[0]
        losses = torch.zeros(n, dtype=scale.dtype, device=x.device)

        def visit(owner, block):
            losses.add_(sigmoid_pairs(x, block, scale, bias, (rank - owner) * n))

        _around_the_ring((y,), visit)
        ctx.save_for_backward(x, y, scale, bias)
        return losses

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, bias = ctx.saved_tensors
        rank, n = world()[0], x.shape[0]
        dx = torch.zeros(x.shape, dtype=scale.dtype, device=x.device)
        dscale, dbias = torch.zeros_like(scale), torch.zeros_like(bias)

        def visit(owner, block):
            dx_block, dy, dscale_block, dbias_block = sigmoid_pairs_backward(
                x, block, scale, bias, (rank - owner) * n, grad)
            dx.add_(dx_block)
            dscale.add_(dscale_block)
            dbias.add_(dbias_block)
            return dy

        dy = _around_the_ring((y,), visit)
        need = ctx.needs_input_grad
        return (dx.to(x.dtype) if need[0] else None, dy.to(y.dtype) if need[1] else None,
                dscale if need[2] else None, dbias if need[3] else None)


def ring_contrastive(
    anchors: Tensor, keys: Tensor, anchor_labels: Tensor, key_labels: Tensor, scale: Tensor, *,
    self_pairs: bool, with_col: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fastcl::cross_contrastive of this rank's anchors (M, D) against every rank's keys, each
    rank passing its own keys (N, D) -> (loss (M,), col loss (N,) or (0,), stats (4, M),
    col stats (4, N) or (4, 0)). Labels are global (int64): a key is a positive of an anchor with
    its label, on any rank. self_pairs: anchors and keys are the same rows, (i, i) left out.
    with_col: the column losses of this rank's keys against every rank's anchors."""
    return _RingContrastive.apply(anchors, keys, anchor_labels, key_labels, scale, self_pairs,
                                  with_col)


def ring_sigmoid(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """fastcl::sigmoid_pairs of this rank's images x (N, D) against every rank's texts, each rank
    passing its own texts y (N, D), the positives at the global diagonal -> row losses (N,)."""
    return _RingSigmoid.apply(x, y, scale, bias)
