"""CMC step for step against the official code (HobbitLong/CMC): the same weights, memory banks,
L / ab views, indices, sampled negatives and hyper-parameters through fastcl's method and the
official training step (train_CMC.py: NCE/NCEAverage.py NCEAverage with its two banks and two Z,
NCE/NCECriterion.py NCECriterion per view, SGD); the loss, every gradient, the parameters, both
banks and both Z agree over three steps."""
import copy

import torch
from torch import nn

from tests.helpers import assert_close
from tests.methods.official.common import (TOL, assert_same, float64_method, official_step_agrees,
                                           params, random_views, sgd, trainer_step)

N, K, B = 32, 16, 8


class NCEAverage(nn.Module):
    """NCE/NCEAverage.py NCEAverage, retyped; the banks are given (the official init is uniform
    in +-1/sqrt(D/3)) and idx is passed in (official: drawn by AliasMethod when None)."""

    def __init__(self, memory_l, memory_ab, K, T=0.07, momentum=0.5):
        super().__init__()
        self.K = K
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum],
                                                    dtype=torch.float64))
        self.register_buffer("memory_l", memory_l.clone())
        self.register_buffer("memory_ab", memory_ab.clone())

    def forward(self, l, ab, y, idx):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_l = self.params[2].item()
        Z_ab = self.params[3].item()
        momentum = self.params[4].item()
        batchSize = l.size(0)
        outputSize = self.memory_l.size(0)
        inputSize = self.memory_l.size(1)
        weight_l = torch.index_select(self.memory_l, 0, idx.view(-1)).detach()
        weight_l = weight_l.view(batchSize, K + 1, inputSize)
        out_ab = torch.bmm(weight_l, ab.view(batchSize, inputSize, 1))
        out_ab = torch.exp(torch.div(out_ab, T))
        weight_ab = torch.index_select(self.memory_ab, 0, idx.view(-1)).detach()
        weight_ab = weight_ab.view(batchSize, K + 1, inputSize)
        out_l = torch.bmm(weight_ab, l.view(batchSize, inputSize, 1))
        out_l = torch.exp(torch.div(out_l, T))
        if Z_l < 0:
            self.params[2] = out_l.mean() * outputSize
            Z_l = self.params[2].clone().detach().item()
        if Z_ab < 0:
            self.params[3] = out_ab.mean() * outputSize
            Z_ab = self.params[3].clone().detach().item()
        out_l = torch.div(out_l, Z_l).contiguous()
        out_ab = torch.div(out_ab, Z_ab).contiguous()
        with torch.no_grad():
            l_pos = torch.index_select(self.memory_l, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(l, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_l = l_pos.div(l_norm)
            self.memory_l.index_copy_(0, y, updated_l)
            ab_pos = torch.index_select(self.memory_ab, 0, y.view(-1))
            ab_pos.mul_(momentum)
            ab_pos.add_(torch.mul(ab, 1 - momentum))
            ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_ab = ab_pos.div(ab_norm)
            self.memory_ab.index_copy_(0, y, updated_ab)
        return out_l, out_ab


def nce_criterion(x, n_data, eps=1e-7):
    """NCE/NCECriterion.py NCECriterion.forward."""
    bsz = x.shape[0]
    m = x.size(1) - 1
    Pn = 1 / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log()
    return - (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


class Normalize(nn.Module):
    """models/alexnet.py Normalize (power 2)."""

    def forward(self, x):
        norm = x.pow(2).sum(1, keepdim=True).pow(1. / 2)
        return x.div(norm)


def test_cmc_steps_match_official():
    # The official settings (NCE, tau 0.07, bank momentum 0.5, SGD lr 0.03 momentum 0.9 wd 1e-4)
    # on color images (L and ab views, one encoder each), banks of N = 32 rows, K = 16.
    fast = float64_method("cmc", channels=3, num_items=N, loss="nce", num_negatives=K,
                          temperature=0.07, bank_momentum=0.5)
    l_to_ab = nn.Sequential(copy.deepcopy(fast.backbone.first), copy.deepcopy(fast.heads[0]),
                            Normalize())
    ab_to_l = nn.Sequential(copy.deepcopy(fast.backbone.second), copy.deepcopy(fast.heads[1]),
                            Normalize())
    contrast = NCEAverage(fast.memories[0].tensor, fast.memories[1].tensor, K, 0.07, 0.5)
    fast_params = params(fast.backbone.first, fast.heads[0], fast.backbone.second, fast.heads[1])
    official_params = params(l_to_ab, ab_to_l)
    fast_opt, official_opt = sgd(fast_params), sgd(official_params)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        (crop,) = random_views(1, channels=3, seed=step)
        index = torch.randperm(N, generator=g)[:B]
        idx = torch.randint(0, N, (B, K + 1), generator=g)  # official: AliasMethod.draw
        idx.select(1, 0).copy_(index)
        loss = trainer_step(fast, fast_opt, [crop, idx[:, 1:].clone()], step, 3, indices=index)

        l, ab = fast.backbone.split(crop)  # the data pipeline's L and ab (not the training step)
        feat_l, feat_ab = l_to_ab(l), ab_to_l(ab)
        out_l, out_ab = contrast(feat_l, feat_ab, index, idx)
        # NCECriterion adds eps = 1e-7 to each denominator P + K / n: the only difference, some
        # 1e-6 of the gradients; without it everything agrees to float64 rounding.
        with_eps = nce_criterion(out_l.detach(), N) + nce_criterion(out_ab.detach(), N)
        assert_close(loss, with_eps.squeeze(), 1e-6, "loss with the official eps")
        official_loss = nce_criterion(out_l, N, 0.0) + nce_criterion(out_ab, N, 0.0)
        official_step_agrees(official_opt, official_loss, loss, fast_params, official_params,
                             step)
        assert_same([m.tensor for m in fast.memories], [contrast.memory_l, contrast.memory_ab],
                    f"step {step} memory banks")
        assert_same([n.z for n in fast.nce], [contrast.params[2], contrast.params[3]], "Z")
