"""SimCLR step for step against a torch retyping of the official TensorFlow code
(google-research/simclr: model.py's one pass over the concatenated views, model_util.py
projection_head 'nonlinear' and linear_layer, objective.py add_contrastive_loss): the same
weights, views and hyper-parameters through fastcl's method and the retyped step; the loss (the
official one is the sum of the two directions, twice fastcl's paper mean), every gradient, the
parameters and the BatchNorm statistics agree over three steps."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_close
from tests.methods.official.common import (TOL, assert_grads, assert_same, float64_method, params,
                                           random_views, sgd, trainer_step)

LARGE_NUM = 1e9


class ScaleOnlyBatchNorm(nn.Module):
    """resnet.batch_norm_relu(relu=False, center=False): BN with a scale gamma and no beta."""

    def __init__(self, dim):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.bn(x) * self.gamma


def projection_head(mid_dim, out_dim):
    """model_util.py projection_head, 'nonlinear' with 2 layers: linear_layer(use_bias=True,
    use_bn=True) (a bias-free dense, BN with beta), ReLU; linear_layer(use_bias=False,
    use_bn=True) (a bias-free dense, BN without beta)."""
    return nn.Sequential(nn.Linear(mid_dim, mid_dim, bias=False), nn.BatchNorm1d(mid_dim),
                         nn.ReLU(), nn.Linear(mid_dim, out_dim, bias=False),
                         ScaleOnlyBatchNorm(out_dim))


def add_contrastive_loss(hidden, temperature):
    """objective.py add_contrastive_loss on one replica (hidden_norm=True, weights 1)."""
    hidden = F.normalize(hidden, dim=-1)
    hidden1, hidden2 = torch.chunk(hidden, 2, 0)
    batch_size = hidden1.shape[0]
    labels = F.one_hot(torch.arange(batch_size), batch_size * 2).to(hidden)
    masks = F.one_hot(torch.arange(batch_size), batch_size).to(hidden)
    logits_aa = hidden1 @ hidden1.T / temperature - masks * LARGE_NUM
    logits_bb = hidden2 @ hidden2.T / temperature - masks * LARGE_NUM
    logits_ab = hidden1 @ hidden2.T / temperature
    logits_ba = hidden2 @ hidden1.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


def test_simclr_steps_match_official():
    # tau 0.1 (ImageNet), the head's width the backbone's (mid_dim), 128-d output; SGD on both
    # sides (the official optimizer is LARS).
    fast = float64_method("simclr", temperature=0.1, proj_hidden=64, proj_dim=128)
    head = projection_head(64, 128).double()
    with torch.no_grad():
        for i in (0, 3):
            head[i].weight.copy_(fast.projector[i].weight)
        head[1].load_state_dict(fast.projector[1].state_dict())
        head[4].gamma.copy_(fast.projector[4].weight)
    official = nn.Sequential(copy.deepcopy(fast.backbone), head)
    fast_params = [p for p in params(fast.backbone, fast.projector) if p.requires_grad]
    official_params = params(official)
    fast_opt, official_opt = sgd(fast_params, lr=0.1), sgd(official_params, lr=0.1)
    for step in range(3):
        views = random_views(2, seed=step)
        # Backward of 2 x the loss: the official loss sums the two directions.
        loss = trainer_step(fast, fast_opt, views, step, 3, scale=2.0)

        features = torch.cat(views, 0)  # model.py: the transforms concatenated on the batch
        official_loss = add_contrastive_loss(official(features), 0.1)
        official_opt.zero_grad()
        official_loss.backward()
        official_opt.step()

        assert_close(2 * loss, official_loss, TOL, f"step {step} loss")
        assert_grads(fast_params, official_params, f"step {step}")
        assert_same(fast_params, official_params, f"step {step} parameters")
        assert not fast.projector[4].bias.any()  # no shift, as the official center=False
        stats = [[t for n, t in m.named_buffers() if "running" in n]
                 for m in (nn.Sequential(fast.backbone, fast.projector), official)]
        assert_same(*stats, f"step {step} BN statistics")
