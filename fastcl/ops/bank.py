"""Queue / memory-bank op family: MoCo's queue, InstDisc's and CMC's memory banks, and losses over
negatives sampled from a bank.

* ``fastcl::ring_enqueue_(queue, pointer, count, keys)``: queue (S, D) is a ring of S rows;
  keys (B, D), B <= S, are written to rows (pointer + b) % S, then pointer <- (pointer + B) % S and
  count <- min(count + B, S). pointer and count are 0-dim int64 tensors on the queue's device and
  are only read and written by the kernels: no host sync, any B (wrap-around included), and
  nothing dropped. keys are cast into the queue's dtype.
* ``fastcl::bank_update_(bank, indices, features, momentum)``: bank (N, D), indices (B,) int64,
  features (B, D): row i <- n(momentum * v_i + (1 - momentum) * f_b) for each indexed row, with
  n(x) = x / max(||x||, 1e-12) and v_i the row before the update, computed in fp32. Duplicate
  indices: the LAST occurrence in the batch wins (b is the largest position with indices[b] == i),
  which is what InstDisc's code (index_select, update, index_copy_) gives on the CPU; identical on
  every backend, and every row is written by one program only.
* ``fastcl::sampled_lse(f, bank, indices, scale, nce_shift)``: f (B, D), bank (N, D), indices
  (B, K + 1) int64 (column 0: the anchor's positive row) -> (positive, lse, nce), each (B,), with
  s_bj = scale * <f_b, bank[indices_bj]> for j = 0..K,
      positive_b = s_b0
      lse_b = log sum_j exp(s_bj)                         (softmax CE: lse_b - positive_b)
      nce_b = sum_j softplus(s_bj - nce_shift)            (InstDisc's NCE, below)
  computed in one pass over the gathered rows, which are never materialized: each anchor reads
  its K + 1 bank rows in place. With nce_shift = log(Z K / n), InstDisc's NCE loss of anchor b is
  nce_b - (positive_b - nce_shift) (see fastcl/losses/bank.py). ``fastcl::sampled_lse_backward``
  gives d f = scale * sum_j w_bj bank[indices_bj] with w_bj = g_pos_b [j = 0] + g_lse_b
  softmax_j(s_b) + g_nce_b sigmoid(s_bj - nce_shift), gathering the rows again; nothing of size
  B x (K + 1) is saved. The positive logit is an output (rather than a separate dot product) so
  that its gradient, which nearly cancels the others', is summed with them in fp32 before d f is
  rounded to a 16-bit dtype.
  The bank gets no gradient; scale (0-dim float32, 1 / temperature) and nce_shift (0-dim float32)
  are constants (no gradient either).

Inputs may be float32, bfloat16 or float16 (fp32 arithmetic, fp32 statistics, d f in f's dtype);
float64 runs the references. The dispatcher picks the backend by device (``register_backends``):
the op bodies run the references below (any device), their CPU kernels csrc/bank.cpp and their
CUDA kernels kernels/bank.py (bank_update_ and sampled_lse for D <= TRITON_MAX_DIM only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl._backend import accumulation_dtype, register_backends, rows_up_to

# The Triton update and sampled-lse kernels keep a whole feature row in registers; wider rows run
# the reference.
TRITON_MAX_DIM = 1024
# n(x) = x / max(||x||, NORM_EPS), as torch.nn.functional.normalize.
NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch. The truth in tests (run in float64).
# ----------------------------------------------------------------------------------------------
def ring_enqueue_ref(queue: Tensor, pointer: Tensor, count: Tensor, keys: Tensor) -> None:
    """In place: queue (S, D) rows (pointer + b) % S <- keys (B, D); pointer, count advance."""
    size, batch = queue.shape[0], keys.shape[0]
    rows = torch.remainder(pointer + torch.arange(batch, device=queue.device), size)
    queue.index_copy_(0, rows, keys.to(queue.dtype))
    pointer.copy_(torch.remainder(pointer + batch, size))
    count.copy_(torch.clamp(count + batch, max=size))


def last_occurrence(indices: Tensor) -> Tensor:
    """indices (B,) -> (B,) bool, True where no later position holds the same index."""
    ordered, order = torch.sort(indices, stable=True)  # equal indices keep their batch order
    last_in_run = torch.ones_like(ordered, dtype=torch.bool)
    last_in_run[:-1] = ordered[1:] != ordered[:-1]
    return torch.empty_like(last_in_run).scatter_(0, order, last_in_run)


def bank_update_ref(bank: Tensor, indices: Tensor, features: Tensor, momentum: float) -> None:
    """In place: bank (N, D) rows indices (B,) <- n(momentum v + (1 - momentum) features), the
    last occurrence of a duplicated index winning."""
    keep = last_occurrence(indices)
    rows, f = indices[keep], features[keep]
    acc = accumulation_dtype(bank)
    mixed = momentum * bank[rows].to(acc) + (1.0 - momentum) * f.to(acc)
    bank[rows] = F.normalize(mixed, dim=1, eps=NORM_EPS).to(bank.dtype)


def sampled_logits_ref(f: Tensor, bank: Tensor, indices: Tensor, scale: Tensor) -> Tensor:
    """s (B, K + 1) = scale * <f_b, bank[indices_bj]>, through a materialized (B, K + 1, D)."""
    acc = accumulation_dtype(f)
    rows = bank[indices].to(acc)  # (B, K + 1, D)
    return torch.einsum("bd,bkd->bk", f.to(acc), rows) * scale.to(acc)


def sampled_lse_ref(f: Tensor, bank: Tensor, indices: Tensor, scale: Tensor,
                    nce_shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(positive (B,), lse (B,), nce (B,)) of the sampled logits, see the module docstring."""
    s = sampled_logits_ref(f, bank, indices, scale)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    nce = torch.logaddexp(s - nce_shift.to(s.dtype), zero).sum(1)  # exact softplus
    return s[:, 0].contiguous(), torch.logsumexp(s, dim=1), nce


def sampled_lse_backward_ref(f: Tensor, bank: Tensor, indices: Tensor, scale: Tensor,
                             nce_shift: Tensor, lse: Tensor, grad_pos: Tensor,
                             grad_lse: Tensor, grad_nce: Tensor) -> Tensor:
    """d f (B, D) of sum(grad_pos * positive + grad_lse * lse + grad_nce * nce)."""
    acc = accumulation_dtype(f)
    rows = bank[indices].to(acc)
    s = torch.einsum("bd,bkd->bk", f.to(acc), rows) * scale.to(acc)
    w = (grad_lse.to(acc)[:, None] * torch.exp(s - lse.to(acc)[:, None])
         + grad_nce.to(acc)[:, None] * torch.sigmoid(s - nce_shift.to(acc)))
    w[:, 0] += grad_pos.to(acc)
    return torch.einsum("bk,bkd->bd", w, rows) * scale.to(acc)


# ----------------------------------------------------------------------------------------------
# fastcl::ring_enqueue_
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::ring_enqueue_", mutates_args=("queue", "pointer", "count"))
def ring_enqueue_(queue: Tensor, pointer: Tensor, count: Tensor, keys: Tensor) -> None:
    """queue (S, D), pointer () int64, count () int64, keys (B, D) with B <= S: see the module
    docstring. Arguments are checked by fastcl.Queue.enqueue."""
    ring_enqueue_ref(queue, pointer, count, keys)


register_backends(ring_enqueue_, "bank", ring_enqueue_ref, "ring_enqueue")


@ring_enqueue_.register_fake
def _(queue, pointer, count, keys):
    return None


# ----------------------------------------------------------------------------------------------
# fastcl::bank_update_
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::bank_update_", mutates_args=("bank",))
def bank_update_(bank: Tensor, indices: Tensor, features: Tensor, momentum: float) -> None:
    """bank (N, D), indices (B,) int64 in [0, N), features (B, D): see the module docstring.
    Arguments are checked by fastcl.MemoryBank.update."""
    bank_update_ref(bank, indices, features, momentum)


def _bank_update_launch(kernels, bank, indices, features, momentum):
    kernels.bank_update(bank, indices, features, last_occurrence(indices), momentum)


register_backends(bank_update_, "bank", bank_update_ref, _bank_update_launch,
                  triton_fits=rows_up_to(TRITON_MAX_DIM))


@bank_update_.register_fake
def _(bank, indices, features, momentum):
    return None


# ----------------------------------------------------------------------------------------------
# fastcl::sampled_lse
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::sampled_lse", mutates_args=())
def sampled_lse(f: Tensor, bank: Tensor, indices: Tensor, scale: Tensor,
                nce_shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """f (B, D), bank (N, D), indices (B, K + 1) int64, scale (), nce_shift () float32 ->
    (positive, lse, nce), each (B,) float32 (float64 for float64 f). Differentiable in f only."""
    return sampled_lse_ref(f, bank, indices, scale, nce_shift)


register_backends(sampled_lse, "bank", sampled_lse_ref, "sampled_lse_fwd",
                  triton_fits=rows_up_to(TRITON_MAX_DIM))


@sampled_lse.register_fake
def _(f, bank, indices, scale, nce_shift):
    acc = accumulation_dtype(f)
    return tuple(f.new_empty(f.shape[0], dtype=acc) for _ in range(3))


@torch.library.custom_op("fastcl::sampled_lse_backward", mutates_args=())
def sampled_lse_backward(f: Tensor, bank: Tensor, indices: Tensor, scale: Tensor,
                         nce_shift: Tensor, lse: Tensor, grad_pos: Tensor, grad_lse: Tensor,
                         grad_nce: Tensor) -> Tensor:
    """d f (B, D) float32 (float64 for float64 f) of
    sum(grad_pos * positive + grad_lse * lse + grad_nce * nce)."""
    return sampled_lse_backward_ref(f, bank, indices, scale, nce_shift, lse, grad_pos, grad_lse,
                                    grad_nce)


register_backends(sampled_lse_backward, "bank", sampled_lse_backward_ref, "sampled_lse_bwd",
                  triton_fits=rows_up_to(TRITON_MAX_DIM))


@sampled_lse_backward.register_fake
def _(f, bank, indices, scale, nce_shift, lse, grad_pos, grad_lse, grad_nce):
    return f.new_empty(f.shape, dtype=accumulation_dtype(f))


def _sampled_lse_setup(ctx, inputs, output):
    f, bank, indices, scale, nce_shift = inputs
    ctx.save_for_backward(f, bank, indices, scale, nce_shift, output[1])


def _sampled_lse_grad(ctx, grad_pos, grad_lse, grad_nce):
    f, bank, indices, scale, nce_shift, lse = ctx.saved_tensors
    # An output that did not reach the loss has no gradient.
    grad_pos, grad_lse, grad_nce = (torch.zeros_like(lse) if g is None else g
                                    for g in (grad_pos, grad_lse, grad_nce))
    df = sampled_lse_backward(f, bank, indices, scale, nce_shift, lse, grad_pos, grad_lse,
                              grad_nce)
    return df.to(f.dtype), None, None, None, None


sampled_lse.register_autograd(_sampled_lse_grad, setup_context=_sampled_lse_setup)
