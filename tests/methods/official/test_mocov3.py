"""MoCo v3 step for step against the official code (facebookresearch/moco-v3): the same weights,
views and hyper-parameters through fastcl's method and the official training step (moco/builder.py
MoCo_ResNet / MoCo_ViT, main_moco.py's cosine momentum, moco/optimizer.py LARS for ResNet, AdamW
for ViT); the loss, every gradient, the parameters, the momentum encoder and the BatchNorm
statistics agree over three steps."""
import copy
import math

import pytest
import torch
from torch import nn

from fastcl.optim import build_optimizer
from tests.helpers import assert_close
from tests.methods.official.common import (TOL, assert_grads, assert_same, float64_method, params,
                                           random_views, trainer_step)


def _build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """moco/builder.py MoCo._build_mlp."""
    mlp = []
    for l in range(num_layers):
        dim1 = input_dim if l == 0 else mlp_dim
        dim2 = output_dim if l == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if l < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class OfficialMoCo(nn.Module):
    """moco/builder.py MoCo with MoCo_ResNet's (vit=False) or MoCo_ViT's MLPs, retyped for one
    process (concat_all_gather the identity, rank 0); base_encoder is the given backbone with the
    official projector as its fc / head."""

    def __init__(self, backbone, vit, dim, mlp_dim, T):
        super().__init__()
        self.T = T
        layers = 3 if vit else 2
        self.base_encoder = nn.Sequential(backbone, _build_mlp(layers, backbone.out_dim,
                                                               mlp_dim, dim))
        self.momentum_encoder = nn.Sequential(copy.deepcopy(backbone),
                                              _build_mlp(layers, backbone.out_dim, mlp_dim, dim))
        self.predictor = _build_mlp(2, dim, mlp_dim, dim, vit)

    def init_momentum_encoder(self):
        for param_b, param_m in zip(self.base_encoder.parameters(),
                                    self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)  # initialize
            param_m.requires_grad = False  # not update by gradient

    @torch.no_grad()
    def _update_momentum_encoder(self, m):
        for param_b, param_m in zip(self.base_encoder.parameters(),
                                    self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1. - m)

    def contrastive_loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        N = logits.shape[0]
        labels = torch.arange(N, dtype=torch.long)
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class LARS(torch.optim.Optimizer):
    """moco/optimizer.py LARS: no rate scaling or weight decay for parameters <= 1D."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0,
                                                (g["trust_coefficient"] * param_norm
                                                 / update_norm), one),
                                    one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def adjust_moco_momentum(epoch, epochs, moco_m):
    """main_moco.py adjust_moco_momentum."""
    return 1. - 0.5 * (1. + math.cos(math.pi * epoch / epochs)) * (1. - moco_m)


@pytest.mark.parametrize("backbone", ["resnet18", "vit_small"])
def test_mocov3_steps_match_official(backbone):
    # The official settings: ResNet T 1.0, LARS lr 0.6 * B / 256, wd 1e-6; ViT T 0.2, AdamW
    # lr 1.5e-4 * B / 256 (x 100 here so that three steps move), wd 0.1, the patch projection
    # frozen; m0 0.99 on the cosine schedule, one step per epoch of three.
    vit = backbone == "vit_small"
    T = 0.2 if vit else 1.0
    fast = float64_method("mocov3", backbone=backbone, temperature=T, proj_hidden=32,
                          proj_dim=16, momentum=0.99)
    official = OfficialMoCo(copy.deepcopy(fast.backbone), vit, 16, 32, T).double()
    official.base_encoder[1].load_state_dict(fast.projector.state_dict())
    official.predictor.load_state_dict(fast.predictor.state_dict())
    official.init_momentum_encoder()
    fast_params = [p for p in params(fast.backbone, fast.projector, fast.predictor)
                   if p.requires_grad]
    official_params = [p for p in params(official.base_encoder, official.predictor)
                       if p.requires_grad]
    if vit:
        # AdamW on every parameter, as main_moco.py (fastcl's build_optimizer would exempt
        # biases and norm parameters from the decay).
        lr = 1.5e-4 * 8 / 256 * 100
        fast_opt = torch.optim.AdamW(fast_params, lr, weight_decay=0.1)
        official_opt = torch.optim.AdamW(official_params, lr, weight_decay=0.1)
    else:
        lr = 0.6 * 8 / 256
        fast_opt = build_optimizer("lars", fast, lr=lr, weight_decay=1e-6)
        official_opt = LARS(official_params, lr, weight_decay=1e-6, momentum=0.9)
    for step in range(3):
        x1, x2 = random_views(2, seed=step)
        loss = trainer_step(fast, fast_opt, [x1, x2], step, 3)

        official_loss = official(x1, x2, adjust_moco_momentum(step, 3, 0.99))
        official_opt.zero_grad()
        official_loss.backward()
        official_opt.step()

        assert_close(loss, official_loss, TOL, f"step {step} loss")
        assert_grads(fast_params, official_params, f"step {step}")
        # AdamW divides by sqrt(v) + 1e-8: the ViT's last LayerNorm bias, whose gradient is 0
        # (the projector's BatchNorm removes any constant shift) up to rounding, moves by
        # rounding / 1e-8, about 1e-9 per step, differently on each side.
        assert_same(fast_params, official_params, f"step {step} parameters",
                    1e-7 if vit else TOL)
        pairs = [(nn.Sequential(fast.backbone, fast.projector), official.base_encoder),
                 (fast.predictor, official.predictor),
                 (fast.momentum_encoder, official.momentum_encoder)]
        for a, b in pairs:
            stats = [[t for n, t in m.named_buffers() if "running" in n] for m in (a, b)]
            assert_same(*stats, f"step {step} BN statistics")
    # fastcl moves the momentum encoder after the step, the official code before the next keys.
    official._update_momentum_encoder(adjust_moco_momentum(3, 3, 0.99))
    assert_same(params(fast.momentum_encoder), params(official.momentum_encoder),
                "momentum encoder")
