"""SupCon step for step against the official code (HobbitLong/SupContrast): the same weights,
views, labels and hyper-parameters through fastcl's method and the official training step
(main_supcon.py train: both views through the model in one batch, losses.py SupConLoss, SGD);
the loss, every gradient, the parameters and the BatchNorm statistics agree over three steps,
with labels (SupCon) and without (SimCLR mode)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_close
from tests.methods.official.common import (TOL, assert_same, float64_method, official_step_agrees,
                                           params, random_views, sgd, trainer_step)


class SupConLoss(nn.Module):
    """losses.py SupConLoss, retyped (contrast_mode 'all')."""

    def __init__(self, temperature=0.07, base_temperature=0.07, eps=1e-9):
        super().__init__()
        self.temperature = temperature
        self.base_temperature = base_temperature
        self.eps = eps  # the official 1e-9, an argument here

    def forward(self, features, labels=None):
        batch_size = features.shape[0]
        if labels is None:
            mask = torch.eye(batch_size, dtype=torch.float32)
        else:
            labels = labels.contiguous().view(-1, 1)
            mask = torch.eq(labels, labels.T).float()
        contrast_count = features.shape[1]
        contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
        anchor_feature = contrast_feature
        anchor_count = contrast_count
        anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T),
                                        self.temperature)
        logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
        logits = anchor_dot_contrast - logits_max.detach()
        mask = mask.repeat(anchor_count, contrast_count)
        logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                    torch.arange(batch_size * anchor_count).view(-1, 1), 0)
        mask = mask * logits_mask
        exp_logits = torch.exp(logits) * logits_mask
        log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True) + self.eps)
        mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
        loss = - (self.temperature / self.base_temperature) * mean_log_prob_pos
        loss = loss.view(anchor_count, batch_size).mean()
        return loss


class SupConResNet(nn.Module):
    """networks/resnet_big.py SupConResNet, head='mlp': encoder, Linear, ReLU, Linear, n()."""

    def __init__(self, encoder, dim_in, feat_dim):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True),
                                  nn.Linear(dim_in, feat_dim))

    def forward(self, x):
        feat = self.encoder(x)
        feat = F.normalize(self.head(feat), dim=1)
        return feat


@pytest.mark.parametrize("supervised", [True, False])
def test_supcon_steps_match_official(supervised):
    # The official settings: tau 0.1 and the loss x tau / 0.07 (base_temperature), SGD lr 0.05
    # momentum 0.9 wd 1e-4, the MLP head of the encoder's width; feat_dim 128.
    fast = float64_method("supcon", temperature=0.1, base_temperature=0.07, proj_hidden=64,
                          proj_dim=128)
    official = SupConResNet(copy.deepcopy(fast.backbone), 64, 128).double()
    official.head.load_state_dict(fast.projector.state_dict())
    # The official log adds eps = 1e-9 to the denominator, a sum that excludes the row's largest
    # logit (its own, 1 / tau) and may be far under 1: the only difference, some 1e-7 of the
    # gradients; without it everything agrees to float64 rounding.
    criterion, with_eps = SupConLoss(temperature=0.1, eps=0.0), SupConLoss(temperature=0.1)
    fast_params, official_params = params(fast.backbone, fast.projector), params(official)
    fast_opt, official_opt = sgd(fast_params, lr=0.05), sgd(official_params, lr=0.05)
    for step in range(3):
        views = random_views(2, seed=step)
        labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(step))
        extras = dict(labels=labels) if supervised else {}
        loss = trainer_step(fast, fast_opt, views, step, 3, **extras)

        images = torch.cat([views[0], views[1]], dim=0)
        bsz = 8
        features = official(images)
        f1, f2 = torch.split(features, [bsz, bsz], dim=0)
        features = torch.cat([f1.unsqueeze(1), f2.unsqueeze(1)], dim=1)
        official_loss = criterion(features, labels) if supervised else criterion(features)
        reference = with_eps(features.detach(), labels if supervised else None)
        assert_close(loss, reference, 1e-6, "loss with the official eps")
        official_step_agrees(official_opt, official_loss, loss, fast_params, official_params,
                             step)
        stats = [[b for n, b in m.named_buffers() if "running" in n]
                 for m in (fast.backbone, official.encoder)]
        assert_same(*stats, f"step {step} BN statistics")
