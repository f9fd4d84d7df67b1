"""BYOL step for step against a torch retyping of the official JAX code (deepmind-research
byol/byol_experiment.py loss_fn and _update_fn, utils/networks.py MLP, utils/helpers.py
regression_loss and l2_normalize, utils/schedules.py target_ema): the same weights, views and
hyper-parameters through fastcl's method and the retyped step; the loss, every gradient, the
online and target parameters and the BatchNorm statistics agree over three steps."""
import copy
import math

import torch
from torch import nn

from tests.helpers import assert_close
from tests.methods.official.common import (TOL, assert_same, float64_method, params, random_views,
                                           sgd, trainer_step)


def mlp(in_dim, hidden_size, output_size):
    """utils/networks.py MLP: Linear (with bias), BatchNorm, ReLU, Linear without bias."""
    return nn.Sequential(nn.Linear(in_dim, hidden_size, bias=True), nn.BatchNorm1d(hidden_size),
                         nn.ReLU(), nn.Linear(hidden_size, output_size, bias=False))


def l2_normalize(x, axis=None, epsilon=1e-12):
    """utils/helpers.py l2_normalize."""
    square_sum = torch.sum(torch.square(x), dim=axis, keepdim=True)
    x_inv_norm = torch.rsqrt(torch.clamp(square_sum, min=epsilon))
    return x * x_inv_norm


def regression_loss(x, y):
    """utils/helpers.py regression_loss."""
    normed_x, normed_y = l2_normalize(x, axis=-1), l2_normalize(y, axis=-1)
    return torch.sum((normed_x - normed_y) ** 2, dim=-1)


def target_ema(global_step, base_ema, max_steps):
    """utils/schedules.py target_ema (with _cosine_decay)."""
    global_step = min(global_step, max_steps)
    decay = 0.5 * (1 + math.cos(math.pi * global_step / max_steps))
    return 1. - (1. - base_ema) * decay


class Network(nn.Module):
    """byol_experiment.py _forward in training: apply_once_fn on each view (the classifier
    head, fed a stop-gradient of the embedding, is left out: it does not touch the loss)."""

    def __init__(self, net, projector, predictor):
        super().__init__()
        self.net, self.projector, self.predictor = net, projector, predictor

    def forward(self, inputs):
        outputs = {}
        for suffix in ("_view1", "_view2"):
            embedding = self.net(inputs["view" + suffix[-1]])
            proj_out = self.projector(embedding)
            outputs["projection" + suffix] = proj_out
            outputs["prediction" + suffix] = self.predictor(proj_out)
        return outputs


def test_byol_steps_match_official():
    # The official settings (base target EMA 0.996, the cosine schedule over max_steps) at small
    # widths; SGD on both sides (the official optimizer is LARS excluding biases and norms).
    steps = 3
    fast = float64_method("byol", momentum_base=0.996, proj_hidden=32, proj_dim=16)
    online = Network(copy.deepcopy(fast.backbone), mlp(64, 32, 16), mlp(16, 32, 16)).double()
    for official, ours in ((online.projector, fast.projector), (online.predictor, fast.predictor)):
        missing = official.load_state_dict(ours.state_dict(), strict=False)
        assert missing.missing_keys == ["0.bias"]  # the official bias before BN: no effect
        nn.init.zeros_(official[0].bias)
    target = copy.deepcopy(online)  # target_params start as the online ones
    for p in target.parameters():
        p.requires_grad = False
    fast_params = params(fast.backbone, fast.projector, fast.predictor)
    official_params = [p for n, p in online.named_parameters() if not n.endswith("0.bias")]
    fast_opt, official_opt = sgd(fast_params, lr=0.1), sgd(online.parameters(), lr=0.1)
    for global_step in range(steps):
        view1, view2 = random_views(2, seed=global_step)
        loss = trainer_step(fast, fast_opt, [view1, view2], global_step, steps)

        inputs = dict(view1=view1, view2=view2)
        online_network_out = online(inputs)
        with torch.no_grad():
            target_network_out = target(inputs)
        repr_loss = regression_loss(online_network_out["prediction_view1"],
                                    target_network_out["projection_view2"])
        repr_loss = repr_loss + regression_loss(online_network_out["prediction_view2"],
                                                target_network_out["projection_view1"])
        repr_loss = torch.mean(repr_loss)
        official_opt.zero_grad()
        repr_loss.backward()
        grads = [p.grad.clone() for p in official_params]
        biases = [p.grad.clone() for n, p in online.named_parameters() if n.endswith("0.bias")]
        official_opt.step()
        tau = target_ema(global_step, 0.996, steps)
        with torch.no_grad():
            for x, y in zip(target.parameters(), online.parameters()):
                x.copy_(x + (1 - tau) * (y - x))

        assert_close(loss, repr_loss, TOL, f"step {global_step} loss")
        assert_same([p.grad for p in fast_params], grads, f"step {global_step} gradients")
        assert_same(biases, [torch.zeros_like(b) for b in biases], "official biases before BN")
        assert_same(fast_params, official_params, f"step {global_step} parameters")
        target_params = [p for n, p in target.named_parameters()
                         if n.startswith(("net.", "projector.")) and n != "projector.0.bias"]
        assert_same(params(fast.target), target_params, f"step {global_step} target")
        # BatchNorm statistics (the official biases before BN start at 0 here and get no
        # gradient, so the running means agree too).
        stats = [[t for n, t in m.named_buffers() if "running" in n]
                 for m in (nn.Sequential(fast.backbone, fast.projector, fast.predictor), online,
                           fast.target, nn.Sequential(target.net, target.projector))]
        assert_same(stats[0], stats[1], f"step {global_step} BN statistics")
        assert_same(stats[2], stats[3], f"step {global_step} target BN statistics")
