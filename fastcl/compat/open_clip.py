"""open_clip's ``ClipLoss`` and ``SigLipLoss`` (``open_clip.loss``), computed by
fastcl.info_nce(symmetric=True) and fastcl.siglip.

    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss = loss_fn(image_features, text_features, logit_scale)   # features (N, D), normalized
    loss = SigLipLoss(rank=rank, world_size=world_size)(image_features, text_features,
                                                        logit_scale, logit_bias)

As in open_clip the features are used as given (the model normalizes them) and logit_scale is
already exponentiated; logit_scale and logit_bias are floats or one-element tensors, which get
their gradients.
"""
from __future__ import annotations

from numbers import Real
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastcl.distributed import world
from fastcl.losses.contrastive import info_nce
from fastcl.losses.siglip import siglip


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
    logit_bias adds the same number to every logit, which the softmax cancels: it changes neither
    the loss nor any other gradient, and gets a zero gradient, as in open_clip.

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

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        """image_features, text_features (N, D); logit_scale: a float or a 0-dim (or one-element)
        tensor. Returns the fp32 loss, or {"contrastive_loss": loss} with output_dict=True."""
        temperature = _temperature(logit_scale)
        distributed = _distributed(self.rank, self.world_size)
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


class SigLipLoss(nn.Module):
    """open_clip's SigLipLoss: -(1 / N) sum_ij log sigmoid(z_ij (logit_scale <x_i, y_j> +
    logit_bias)), z_ij = 1 for i == j and -1 otherwise (fastcl.siglip, features as given).

    Distributed (world_size > 1, torch.distributed initialized with that rank and world size):
    every dist_impl ('bidir', the default, 'shift', 'reduce', 'gather') computes the same loss,
    each rank's images against every rank's texts, the texts' gradients sent back to their rank:
    fastcl.siglip(gather=True), which gathers the texts with their gradient. cache_labels is
    accepted; no labels are materialized.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        """image_features, text_features (N, D) -> the fp32 loss, or {"contrastive_loss": loss}
        with output_dict=True."""
        loss = siglip(image_features, text_features, _scalar("logit_scale", logit_scale),
                      _scalar("logit_bias", logit_bias), normalize=False,
                      gather=_distributed(self.rank, self.world_size))
        return {"contrastive_loss": loss} if output_dict else loss


DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _distributed(rank: int, world_size: int) -> bool:
    """world_size > 1, checked against the initialized process group."""
    if world_size > 1 and world() != (rank, world_size):
        raise ValueError(f"rank={rank}, world_size={world_size} must be those of the initialized "
                         f"torch.distributed process group, got (rank, world size) = {world()}")
    return world_size > 1


def _scalar(name: str, value):
    """A float, or a one-element tensor as a 0-dim one (open_clip's logit_scale, logit_bias)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        return value.reshape(())
    return value


def _temperature(logit_scale):
    """1 / logit_scale: a float, or a 0-dim tensor carrying logit_scale's gradient."""
    logit_scale = _scalar("logit_scale", logit_scale)
    if isinstance(logit_scale, Tensor):
        # In fp32 at least: a 16-bit reciprocal would round the temperature.
        return logit_scale.to(torch.promote_types(logit_scale.dtype, torch.float32)).reciprocal()
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, Real) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a number > 0 or a tensor, got {logit_scale!r}")
    return 1.0 / float(logit_scale)
