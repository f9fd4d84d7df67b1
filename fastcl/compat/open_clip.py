"""open_clip's ``ClipLoss`` (``open_clip.loss``), computed by fastcl.info_nce(symmetric=True).

    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss = loss_fn(image_features, text_features, logit_scale)   # features (N, D), normalized

As in open_clip the features are used as given (the model normalizes them) and logit_scale is
already exponentiated (a float or a 0-dim tensor, which gets its gradient). logit_bias adds the
same number to every logit, which the softmax cancels: it changes neither the loss nor any other
gradient, and gets a zero gradient, as in open_clip.
"""
from __future__ import annotations

from numbers import Real

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastcl.distributed import world
from fastcl.losses.contrastive import info_nce


class _SumGradOverRanks(torch.autograd.Function):
    """Identity whose backward all-reduces (sums) the gradient over ranks, times `factor`."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad * ctx.factor, None


class ClipLoss(nn.Module):
    """open_clip's ClipLoss: the mean of the image->text and text->image cross-entropies over the
    logits logit_scale * image_features @ text_features.T (+ logit_bias), row i's label i.

    Distributed (world_size > 1, torch.distributed initialized with that rank and world size):
    * local_loss=True, gather_with_grad=True: each rank's rows against every rank's (fastcl's
      gather=True); the loss of the local rows, gradients summed over ranks, as open_clip;
    * local_loss=False (either gather_with_grad): the loss of all world_size * N rows on every
      rank, with open_clip's gradients: those of the local rows' loss summed over ranks with
      gather_with_grad=True, averaged without; logit_scale's gradient is the full loss's on
      every rank.
    local_loss=True with gather_with_grad=False (a gradient without the other ranks' terms) and
    use_horovod=True raise a ValueError. cache_labels is accepted; no labels are materialized.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: fastcl.compat.open_clip.ClipLoss "
                             "gathers with torch.distributed; pass use_horovod=False")
        if world_size > 1 and local_loss and not gather_with_grad:
            raise ValueError("local_loss=True with gather_with_grad=False is not supported (its "
                             "gradient leaves out the other ranks' terms); pass "
                             "gather_with_grad=True: the same loss, with the full gradient")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.cache_labels, self.use_horovod = cache_labels, use_horovod
        self.rank, self.world_size = rank, world_size

    def _check_world(self) -> None:
        if world() != (self.rank, self.world_size):
            raise ValueError(f"rank={self.rank}, world_size={self.world_size} must be those of the "
                             f"initialized torch.distributed process group, got (rank, world "
                             f"size) = {world()}")

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        """image_features, text_features (N, D); logit_scale: a float or a 0-dim (or one-element)
        tensor. Returns the fp32 loss, or {"contrastive_loss": loss} with output_dict=True."""
        temperature = _temperature(logit_scale)
        distributed = self.world_size > 1
        if distributed:
            self._check_world()
        if distributed and not self.local_loss:
            # Value: the mean of every rank's local loss. Gradient: the local loss's (fastcl's
            # gather sums it over ranks), scaled to open_clip's; logit_scale's summed over ranks.
            factor = 1.0 if self.gather_with_grad else 1.0 / self.world_size
            if isinstance(temperature, Tensor) and temperature.requires_grad:
                temperature = _SumGradOverRanks.apply(temperature, 1.0 / (self.world_size * factor))
            local = info_nce(image_features, text_features, temperature=temperature,
                             symmetric=True, normalize=False, gather=True) * factor
            total = local.detach().clone()
            dist.all_reduce(total)
            loss = local + (total / (self.world_size * factor) - local).detach()
        else:
            loss = info_nce(image_features, text_features, temperature=temperature,
                            symmetric=True, normalize=False, gather=distributed)
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            loss = loss + (logit_bias * 0).sum()
        return {"contrastive_loss": loss} if output_dict else loss


def _temperature(logit_scale):
    """1 / logit_scale: a float, or a 0-dim tensor carrying logit_scale's gradient."""
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a float or a one-element tensor, got shape "
                             f"{tuple(logit_scale.shape)}")
        # In fp32 at least: a 16-bit reciprocal would round the temperature.
        return logit_scale.reshape(()).to(torch.promote_types(logit_scale.dtype,
                                                              torch.float32)).reciprocal()
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, Real) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a number > 0 or a tensor, got {logit_scale!r}")
    return 1.0 / float(logit_scale)
