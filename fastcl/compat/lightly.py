"""lightly's ``NTXentLoss``, ``DINOLoss``, ``SwaVLoss`` and ``NegativeCosineSimilarity``
(``lightly.loss``, version 1.6), computed by fastcl.nt_xent / info_nce over a fastcl.Queue,
fastcl.dino_loss and fastcl.sinkhorn.

    loss_fn = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))   # MoCo
    loss = loss_fn(out0, out1)
    loss_fn = DINOLoss(output_dim=65536, warmup_teacher_temp_epochs=30)
    loss = loss_fn(teacher_out, student_out, epoch=epoch)                   # lists of (B, K)
"""
from __future__ import annotations

from numbers import Integral
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import _checks
from fastcl._backend import accumulation_dtype
from fastcl.distributed import all_gather_no_grad, world
from fastcl.losses.contrastive import info_nce, nt_xent
from fastcl.losses.dino import codes_cross_entropy, dino_loss, update_center_
from fastcl.memory import Queue
from fastcl.ops.sinkhorn import sinkhorn


def _check_distributed(name: str, value: bool) -> None:
    if value and not dist.is_available():
        raise ValueError(f"{name} is True but torch.distributed is not available; pass "
                         f"{name}=False or install a torch build with distributed support")


class NTXentLoss(nn.Module):
    """lightly's NTXentLoss: SimCLR's NT-Xent over the 2N normalized embeddings of out0, out1
    (N, D) (fastcl.nt_xent), or with memory_bank_size=(K, D) MoCo's InfoNCE of out0 against its
    positive out1 and the K rows of a memory bank (fastcl.info_nce over a fastcl.Queue).

    The bank (``memory_bank``, a fastcl.Queue of random unit rows, not saved in state_dict, as
    lightly's) is read before it is written; it takes the normalized out1 only when out0 requires
    grad, and as lightly's it writes the batch at the pointer, drops the rows past its end and
    restarts at row 0. gather_distributed=True: without a bank, every rank's embeddings are
    negatives (fastcl's gather); with one, every rank's out1 is enqueued, in rank order.
    A temperature <= 0 raises a ValueError (lightly accepts negative ones).
    """

    def __init__(self, temperature: float = 0.5,
                 memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        _checks.positive_scalar("temperature", temperature)
        _check_distributed("gather_distributed", gather_distributed)
        self.temperature, self.gather_distributed = temperature, gather_distributed
        self.memory_bank = _memory_bank(memory_bank_size)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """out0, out1: (N, D) -> the fp32 mean loss."""
        if self.memory_bank is None:
            _checks.paired_embeddings(out0=out0, out1=out1)
            if out0.shape[0] * (world()[1] if self.gather_distributed else 1) == 1:
                # One pair: each anchor's only candidate is its positive, a loss of 0.
                return (out0.to(accumulation_dtype(out0)).sum() + out1.sum()) * 0
            return nt_xent(out0, out1, self.temperature, gather=self.gather_distributed)
        update = out0.requires_grad
        bank = self.memory_bank.tensor
        # The loss's backward reads the bank as it was: copy it before the write, as lightly does.
        loss = info_nce(out0, out1, bank.clone() if update else bank, self.temperature)
        if update:
            self._enqueue(out1)
        return loss

    @torch.no_grad()
    def _enqueue(self, out1: Tensor) -> None:
        keys = F.normalize(out1.detach().to(accumulation_dtype(out1)), dim=1)
        if self.gather_distributed:
            keys = all_gather_no_grad(keys)
        free = self.memory_bank.size - int(self.memory_bank.pointer)  # a sync, as lightly's
        self.memory_bank.enqueue(keys[:free])


def _memory_bank(size) -> Optional[Queue]:
    """lightly's memory_bank_size: 0 (no bank) or (K, D) -> a Queue of K random unit rows whose
    buffers are left out of state_dict, as lightly's."""
    sizes = (size,) if isinstance(size, Integral) else tuple(size)
    if sizes == (0,):
        return None
    if len(sizes) != 2 or not all(isinstance(s, Integral) and s > 0 for s in sizes):
        raise ValueError(f"memory_bank_size must be 0 (no memory bank) or a (num_features, dim) "
                         f"tuple of positive ints, got {size!r}")
    queue = Queue(int(sizes[0]), int(sizes[1]))
    for name, buffer in list(queue.named_buffers()):
        queue.register_buffer(name, buffer, persistent=False)
    return queue


class DINOLoss(nn.Module):
    """lightly's DINOLoss: DINO's cross-entropy between the centered, sharpened teacher softmax
    of the T teacher views and the student softmax of the S student views (the teacher's views
    being the student's first T), over the pairs of different views (fastcl.dino_loss); then the
    center (buffer ``center`` (1, 1, output_dim)) is updated with the teacher's mean, all-reduced
    when torch.distributed is initialized.

    The teacher temperature: teacher_temp of the call, else the warm-up schedule at epoch
    (lightly's float32 torch.linspace), else teacher_temp of the constructor. More teacher views
    than student views (T > S) raises a ValueError: fastcl pairs each teacher view with the
    student's view of the same index.
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
                 student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean"):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"center_mode must be 'mean' (the only mode lightly has), got "
                             f"{center_mode!r}")
        _checks.count("output_dim", output_dim)
        for name, value in [("teacher_temp", teacher_temp), ("student_temp", student_temp),
                            ("warmup_teacher_temp", warmup_teacher_temp)]:
            _checks.positive_scalar(name, value)
        self.teacher_temp, self.student_temp = teacher_temp, student_temp
        self.center_momentum = _checks.unit_interval("center_momentum", center_momentum)
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp,
                                                    warmup_teacher_temp_epochs)

    def forward(self, teacher_out: List[Tensor], student_out: List[Tensor],
                teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> Tensor:
        """teacher_out: T tensors (B, output_dim), student_out: S tensors (B, output_dim) ->
        the fp32 loss; updates the center."""
        if teacher_temp is not None:
            temperature = torch.tensor(teacher_temp)
        elif epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            temperature = self.teacher_temp_schedule[epoch]
        else:
            temperature = torch.tensor(self.teacher_temp)
        teacher, student = torch.stack(list(teacher_out)), torch.stack(list(student_out))
        t, s = teacher.shape[0], student.shape[0]
        if t * s - min(t, s) == 0:
            raise ValueError(f"DINOLoss requires at least two views in total (the pairs of the "
                             f"same view index are left out), got {t} teacher view(s) and {s} "
                             f"student view(s)")
        if t > s:
            raise ValueError(f"teacher_out has {t} views but student_out only {s}: the teacher's "
                             f"views must be the student's first ones")
        # A copy of the center: the op keeps it for backward and update_center writes in place.
        loss = dino_loss(student, teacher, self.center.reshape(-1).clone(), self.student_temp,
                         temperature)
        self.update_center(teacher)
        return loss

    def update_center(self, teacher_out: Tensor) -> None:
        """center <- m * center + (1 - m) * mean of teacher_out (views, B, output_dim) over views
        and batch, and over every rank. (lightly's also takes a 2-D tensor, and then averages
        all its entries into every coordinate.)"""
        _checks.embeddings("teacher_out", teacher_out, ndim=3)
        update_center_(self.center, teacher_out, self.center_momentum)


class SwaVLoss(nn.Module):
    """lightly's SwaVLoss: for each high-resolution crop, the Sinkhorn-Knopp codes of its
    prototype scores (fastcl.sinkhorn, with the queue's scores appended when given) are the
    targets of every other crop's softmax at `temperature` (fastcl's codes cross-entropy).
    Returns the fp32 loss of shape (1,), as lightly's. sinkhorn_gather_distributed=True computes
    the codes over every rank's rows. sinkhorn_iterations must be >= 1 (0 iterations leaves the
    codes unnormalized).
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 sinkhorn_epsilon: float = 0.05, sinkhorn_gather_distributed: bool = False):
        super().__init__()
        _check_distributed("sinkhorn_gather_distributed", sinkhorn_gather_distributed)
        _checks.positive_scalar("temperature", temperature)
        _checks.positive_scalar("sinkhorn_epsilon", sinkhorn_epsilon, tensor=False)
        _checks.count("sinkhorn_iterations", sinkhorn_iterations)
        self.temperature, self.sinkhorn_iterations = temperature, sinkhorn_iterations
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_gather_distributed = sinkhorn_gather_distributed

    def forward(self, high_resolution_outputs: List[Tensor], low_resolution_outputs: List[Tensor],
                queue_outputs: Optional[List[Tensor]] = None) -> Tensor:
        """Each output (B, K) prototype scores; queue_outputs: one (Q, K) per high-resolution
        crop, or None."""
        codes = []
        for i, scores in enumerate(high_resolution_outputs):
            rows = scores.shape[0]
            if queue_outputs is not None:
                scores = torch.cat([scores, queue_outputs[i]])
            codes.append(sinkhorn(scores, self.sinkhorn_epsilon, self.sinkhorn_iterations,
                                  gather=self.sinkhorn_gather_distributed)[:rows])
        student = torch.stack(list(high_resolution_outputs) + list(low_resolution_outputs))
        return codes_cross_entropy(student, torch.stack(codes), self.temperature).reshape(1)


class NegativeCosineSimilarity(nn.Module):
    """lightly's NegativeCosineSimilarity: -mean cos(x0, x1) along `dim` (SimSiam's loss, both
    inputs get a gradient), computed in fp32 for 16-bit inputs. O(N D): no fused op applies."""

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        acc = accumulation_dtype(x0, x1)
        return -F.cosine_similarity(x0.to(acc), x1.to(acc), self.dim, self.eps).mean()
