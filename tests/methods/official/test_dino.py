"""DINO step for step against the official code (facebookresearch/dino): the same weights, crops
and hyper-parameters through fastcl's method and the official training step (main_dino.py
train_one_epoch: DINOLoss with its centering and teacher-temperature warm-up, utils.clip_gradients,
utils.cancel_gradients_last_layer, AdamW on utils.get_params_groups, the teacher EMA on the
cosine momentum schedule); the loss, every gradient, the student and teacher parameters, BatchNorm
statistics and the center agree over three steps (epochs 0, 1, 2: the last layer frozen in the
first, the teacher temperature warming up)."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcl.optim import build_optimizer
from tests.helpers import assert_close
from tests.methods.official.common import (TOL, assert_same, float64_method, random_views,
                                           trainer_step)


class OfficialDINOHead(nn.Module):
    """vision_transformer.py DINOHead, retyped (nlayers = 3; the weights are loaded afterwards,
    so the official trunc_normal_ init of the MLP is left out; its biases start at 0 as there)."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim)]
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, hidden_dim))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm, as the official code
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        x = self.last_layer(x)
        return x


class MultiCropWrapper(nn.Module):
    """utils.py MultiCropWrapper: the backbone once per resolution, the head once on all."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0])
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx:end_idx]))
            output = torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)


class OfficialDINOLoss(nn.Module):
    """main_dino.py DINOLoss, retyped for one process (the all-reduce is the identity)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (
            1 - self.center_momentum)


def clip_gradients(model, clip):
    """utils.py clip_gradients."""
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """utils.py cancel_gradients_last_layer."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def get_params_groups(model):
    """utils.py get_params_groups: no weight decay on biases and norm parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.}]


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep):
    """utils.py cosine_scheduler without warm-up."""
    iters = np.arange(epochs * niter_per_ep)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))


def _paired(fast, official):
    """(fastcl parameters, their official counterparts, official MLP biases fastcl has not)."""
    fast_list = list(fast.backbone.parameters()) + list(fast.head.mlp.parameters())
    official_list = list(official.backbone.parameters())
    extra = []
    fast_mlp = dict(fast.head.mlp.named_parameters())
    for name, p in official.head.mlp.named_parameters():
        (official_list if name in fast_mlp else extra).append(p)
    fast_list += [fast.head.last_layer.weight, fast.head.last_norm]
    official_list += [official.head.last_layer.weight_v, official.head.last_layer.weight_g]
    return fast_list, official_list, extra


@pytest.mark.parametrize("use_bn, norm_last_layer", [(0, 1), (1, 0)])
def test_dino_steps_match_official(use_bn, norm_last_layer):
    # The official settings (EMA centering, tau_s 0.1, tau_t 0.04 -> 0.07, center momentum 0.9,
    # teacher momentum 0.996, clip 3.0, last layer frozen in epoch 0; use_bn_in_head and
    # norm_last_layer both ways) at small widths, 2 global crops of 8 px and 2 local ones of 4 px;
    # three epochs of one step each, the teacher temperature warming up over all three.
    epochs, out_dim = 3, 32
    fast = float64_method("dino", out_dim=out_dim, head_hidden=32, bottleneck=16,
                          bn_in_head=use_bn, norm_last_layer=norm_last_layer, centering="ema",
                          student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                          warmup_teacher_temp_epochs=epochs, center_momentum=0.9,
                          teacher_momentum=0.996, freeze_last_layer=1, clip_grad=3.0,
                          num_local_crops=2)
    head = OfficialDINOHead(64, out_dim, bool(use_bn), bool(norm_last_layer), 32, 16).double()
    result = head.mlp.load_state_dict(fast.head.mlp.state_dict(), strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        head.last_layer.weight_v.copy_(fast.head.last_layer.weight)
        head.last_layer.weight_g.copy_(fast.head.last_norm)
    student = MultiCropWrapper(copy.deepcopy(fast.backbone), head)
    teacher = MultiCropWrapper(copy.deepcopy(fast.backbone),
                               OfficialDINOHead(64, out_dim, bool(use_bn), True, 32, 16).double())
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = OfficialDINOLoss(out_dim, 4, 0.04, 0.07, epochs, epochs, 0.1, 0.9).double()
    momentum_schedule = cosine_scheduler(0.996, 1, epochs, 1)

    fast_params, official_params, extra = _paired(fast, student)
    fast_teacher, official_teacher, _ = _paired(
        type("T", (), dict(backbone=fast.teacher[0], head=fast.teacher[1]))(), teacher)
    fast_opt = build_optimizer("adamw", fast, lr=1e-3, weight_decay=0.04)
    official_opt = torch.optim.AdamW(get_params_groups(student), lr=1e-3, weight_decay=0.04)
    for epoch in range(epochs):
        images = random_views(2, seed=epoch) + random_views(2, side=4, seed=10 + epoch)
        loss = trainer_step(fast, fast_opt, images, epoch, epochs, epoch=epoch)

        teacher_output = teacher(images[:2])
        student_output = student(images)
        official_loss = dino_loss(student_output, teacher_output, epoch)
        official_opt.zero_grad()
        official_loss.backward()
        clip_gradients(student, 3.0)
        cancel_gradients_last_layer(epoch, student, 1)
        grads = [None if p.grad is None else p.grad.clone() for p in official_params]
        official_opt.step()
        with torch.no_grad():
            m = momentum_schedule[epoch]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)

        assert_close(loss, official_loss, TOL, f"epoch {epoch} loss")
        for i, (p, g) in enumerate(zip(fast_params, grads)):
            assert (p.grad is None) == (g is None), f"epoch {epoch} [{i}]: gradient on one side"
            if g is not None:
                assert_close(p.grad, g, TOL, f"epoch {epoch} [{i}] gradient")
        for p in extra:  # biases before BatchNorm: no gradient, as fastcl has none
            assert_close(p.grad, torch.zeros_like(p), TOL, "official bias before BN")
        assert_same(fast_params, official_params, f"epoch {epoch} student")
        assert_same(fast_teacher, official_teacher, f"epoch {epoch} teacher")
        assert_same([fast.criterion.center], [dino_loss.center], f"epoch {epoch} center")
        stats = [[b for n, b in m.named_buffers() if "running" in n]
                 for m in (nn.Sequential(fast.backbone, fast.head), student, fast.teacher,
                           teacher)]
        assert_same(stats[0], stats[1], f"epoch {epoch} student BN statistics")
        assert_same(stats[2], stats[3], f"epoch {epoch} teacher BN statistics")
