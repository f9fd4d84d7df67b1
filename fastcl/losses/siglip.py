"""SigLIP's sigmoid loss (Zhai et al., 2023, https://arxiv.org/abs/2303.15343), as a function and
a drop-in ``nn.Module``.

Every (image, text) pair is a binary classification: the logit t_ij = scale <x_i, y_j> + bias is
pushed up for the matching pair (i, i) and down for every other one,

    loss = -(1 / N) sum_ij log sigmoid(z_ij t_ij),   z_ij = +1 if i == j else -1,

open_clip's ``SigLipLoss``. It is computed by the fused ops of fastcl.ops.siglip, which never
materialize the N x N logits (forward or backward) and keep the tiny losses of well-separated
pairs exact: with reduction "mean" or "sum" and embeddings requiring grad, sigmoid_pairs_sum
(gradients formed in the forward's pass, the normalization inside the op), otherwise
sigmoid_pairs. Inputs may be float32, bfloat16 or float16 (fp32 accumulation, fp32
loss, gradients rounded to the input dtype once) or float64 (the reference, in float64).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from fastcl import _checks
from fastcl.distributed import all_gather_with_grad, world
from fastcl.losses.contrastive import Gather, _embed, _reduce
from fastcl.ops.siglip import sigmoid_pairs, sigmoid_pairs_sum
from fastcl.ring import ring_sigmoid

Scalar = Union[float, Tensor]


def siglip(
    image: Tensor,
    text: Tensor,
    scale: Scalar,
    bias: Scalar,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    gather: Gather = False,
) -> Tensor:
    """SigLIP's sigmoid loss of image (N, D) and text (N, D) embeddings; text i matches image i.

    scale: the logit scale, ALREADY exponentiated (a float > 0 or a 0-dim tensor), as open_clip's
    SigLipLoss takes it: pass ``log_scale.exp()`` when the model learns log_scale (SigLIP starts
    at log 10). bias: the logit bias (SigLIP starts at -10). A tensor scale or bias receives its
    gradient.
    normalize=True: rows L2-normalized (in fp32) first; False: raw dot products.
    reduction: "mean" (open_clip's value: the sum over all pairs divided by N), "sum" (not
    divided) or "none" (the (N,) per-image sums over texts).
    gather=True (torch.distributed): each rank's images meet the texts of every rank (gathered
    with their gradient), positives at column rank * N + i; each rank's "mean" divides by its own
    N, so that DDP's average over ranks equals the single-process loss over the W * N pairs of
    rows, gradients included. gather="ring": the same loss and gradients with each rank holding only
    its own texts (they travel around the ring, fastcl.ring); the scale's and bias's gradients on
    a rank are those of its own loss, summed over ranks by DDP.
    """
    _checks.paired_embeddings(image=image, text=text)
    _checks.reduction(reduction)
    _checks.gather(gather)
    scale_t = _checks.scalar_tensor("scale", scale, image)
    bias_t = _checks.scalar_tensor("bias", bias, image, positive=False)
    rank, size = world() if gather else (0, 1)
    if size > 1 and gather == "ring":
        losses = ring_sigmoid(_embed(image, normalize), _embed(text, normalize), scale_t, bias_t)
        return _reduce(losses, reduction)
    texts = all_gather_with_grad(text) if size > 1 else text
    offset = rank * image.shape[0]
    if reduction != "none" and torch.is_grad_enabled() and (image.requires_grad
                                                            or texts.requires_grad):
        # One scalar: its gradients come from the forward's pass (fastcl::sigmoid_pairs_sum).
        loss = sigmoid_pairs_sum(image, texts, scale_t, bias_t, offset, normalize)[0]
        return loss / image.shape[0] if reduction == "mean" else loss
    losses = sigmoid_pairs(_embed(image, normalize), _embed(texts, normalize), scale_t, bias_t,
                           offset)
    return _reduce(losses, reduction)


class SigLIPLoss(nn.Module):
    """Module form of :func:`siglip`: ``loss = SigLIPLoss()(image, text, log_scale.exp(), bias)``.
    scale and bias are arguments of forward because the model learns them (open_clip keeps them
    in the model, as ``logit_scale`` and ``logit_bias``)."""

    def __init__(self, *, normalize: bool = True, reduction: str = "mean", gather: Gather = False):
        super().__init__()
        self.normalize, self.reduction = normalize, _checks.reduction(reduction)
        self.gather = _checks.gather(gather)

    def forward(self, image: Tensor, text: Tensor, scale: Scalar, bias: Scalar) -> Tensor:
        return siglip(image, text, scale, bias, normalize=self.normalize,
                      reduction=self.reduction, gather=self.gather)
