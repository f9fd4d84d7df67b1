"""SimSiam step for step against the official code (facebookresearch/simsiam): the same weights,
views and hyper-parameters through fastcl's method and optimizer and the official training step;
the loss, every gradient and the parameters after SGD (the predictor at the fixed peak lr, the
rest on the cosine schedule) agree over three steps."""
import copy
import math

import torch
from torch import nn

from fastcl.optim import build_optimizer, cosine_with_warmup, set_lr
from tests.methods.official.common import (assert_same, float64_method, official_step_agrees,
                                           random_views, trainer_step)


class OfficialSimSiam(nn.Module):
    """simsiam/builder.py SimSiam, retyped; base_encoder(num_classes=dim) is the given backbone
    with the official fc (whose bias is kept, frozen at its random init)."""

    def __init__(self, backbone, prev_dim, dim, pred_dim):
        super().__init__()
        fc = nn.Linear(prev_dim, dim)
        fc.bias.requires_grad = False  # not use bias as followed by BN
        self.encoder = nn.Sequential(backbone, nn.Sequential(
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim),
            nn.ReLU(inplace=True),
            nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim),
            nn.ReLU(inplace=True),
            fc, nn.BatchNorm1d(dim, affine=False)))
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False),
                                       nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                                       nn.Linear(pred_dim, dim))

    def forward(self, x1, x2):
        z1 = self.encoder(x1)
        z2 = self.encoder(x2)
        p1 = self.predictor(z1)
        p2 = self.predictor(z2)
        return p1, p2, z1.detach(), z2.detach()


def adjust_learning_rate(optimizer, init_lr, epoch, epochs):
    """main_simsiam.py: cosine decay; the fix_lr group (the predictor) stays at init_lr."""
    cur_lr = init_lr * 0.5 * (1. + math.cos(math.pi * epoch / epochs))
    for param_group in optimizer.param_groups:
        if 'fix_lr' in param_group and param_group['fix_lr']:
            param_group['lr'] = init_lr
        else:
            param_group['lr'] = cur_lr


def test_simsiam_steps_match_official():
    # Official widths relative to the backbone: projector d -> d -> d -> d, predictor d -> d/4 -> d.
    fast = float64_method("simsiam", proj_dim=64, pred_hidden=16, fixed_predictor_lr=1)
    official = OfficialSimSiam(copy.deepcopy(fast.backbone), 64, 64, 16).double()
    missing = official.encoder[1].load_state_dict(fast.projector.state_dict(), strict=False)
    assert missing.missing_keys == ["6.bias"]  # the official frozen fc bias
    official.predictor.load_state_dict(fast.predictor.state_dict())

    # main_simsiam.py: lr = 0.05 * B / 256, SGD momentum 0.9, --fix-pred-lr; cosine per epoch
    # (one step per epoch here). Weight decay 0: fastcl exempts biases and BatchNorm parameters
    # from it (as LARS recipes do), the official SGD decays every parameter.
    init_lr, steps = 0.05 * 8 / 256, 3
    fast_opt = build_optimizer("sgd", fast, lr=init_lr, weight_decay=0.0)
    official_opt = torch.optim.SGD(
        [{"params": official.encoder.parameters(), "fix_lr": False},
         {"params": official.predictor.parameters(), "fix_lr": True}],
        init_lr, momentum=0.9, weight_decay=0.0)
    criterion = nn.CosineSimilarity(dim=1)
    fast_params = [p for p in fast.parameters() if p.requires_grad]
    official_params = [p for p in official.parameters() if p.requires_grad]
    for step in range(steps):
        x1, x2 = random_views(2, seed=step)
        set_lr(fast_opt, cosine_with_warmup(step, steps, 0, init_lr))
        loss = trainer_step(fast, fast_opt, [x1, x2], step, steps)

        adjust_learning_rate(official_opt, init_lr, step, steps)
        p1, p2, z1, z2 = official(x1, x2)
        official_loss = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5
        official_step_agrees(official_opt, official_loss, loss, fast_params, official_params,
                             step)
    # BatchNorm statistics too, but the last BN's running mean, which carries the official
    # frozen fc bias (a constant shift that the batch statistics of training remove).
    fast_stats = {k: v for k, v in fast.state_dict().items() if "running" in k}
    official_stats = {k: v for k, v in official.state_dict().items() if "running" in k}
    skip = "encoder.1.7.running_mean"
    assert_same([v for k, v in fast_stats.items() if k != "projector.7.running_mean"],
                [v for k, v in official_stats.items() if k != skip], "BN statistics")
