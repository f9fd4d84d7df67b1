"""MoCo v1, MoCo v3, SimCLR v2, SimSiam and DINO: losses against their formulas (float64), the
momentum encoders, queues and schedules, ViT variants, a few training steps, bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcl
from fastcl import formulas
from fastcl.losses import DINOLoss
from fastcl.losses.simclrv2 import NTXentMemoryLoss, nt_xent_memory
from fastcl.losses.simsiam import negative_cosine, simsiam_loss
from fastcl.methods.mocov1 import shuffled_bn_forward
from fastcl.optim import build_optimizer, set_lr
from tests.helpers import make_method, train_on_batch, uint8_images


def _fit(method, steps=8, epoch=1, lr=1e-2):
    """Adam on one fixed batch of augmented views; returns the losses."""
    images, g = uint8_images()
    views = method.augment(images, g)
    return train_on_batch(method, views, steps, epoch=epoch, lr=lr)


def _float64(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()


# ----------------------------------------------------------------------------------------------
# Losses against their formulas
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, d, k", [(5, 7, 11), (2, 3, 1)])
def test_nt_xent_memory_matches_formula(n, d, k):
    z1, z2 = _float64(n, d, 0), _float64(n, d, 1)
    memory = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    loss = nt_xent_memory(z1, z2, memory, 0.3)
    expected = formulas.nt_xent_memory(z1, z2, memory, 0.3)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (z1, z2))
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (z1, z2)))
    per_anchor = NTXentMemoryLoss(0.3, reduction="none")(z1, z2, memory)
    torch.testing.assert_close(per_anchor, formulas.nt_xent_memory(z1, z2, memory, 0.3,
                                                                   reduction="none"))
    # No memory: plain NT-Xent.
    torch.testing.assert_close(nt_xent_memory(z1, z2, None, 0.3), fastcl.nt_xent(z1, z2, 0.3))


def test_nt_xent_memory_float32_close_to_float64():
    z1, z2 = _float64(6, 16, 2), _float64(6, 16, 3)
    memory = F.normalize(torch.randn(9, 16, dtype=torch.float64), dim=1)
    loss = nt_xent_memory(z1.float(), z2.float(), memory.float(), 0.2)
    torch.testing.assert_close(loss.double(), formulas.nt_xent_memory(z1, z2, memory, 0.2),
                               rtol=1e-5, atol=1e-5)


def test_simsiam_loss_matches_formula():
    p1, p2, z1, z2 = (_float64(6, 5, s) for s in range(4))
    loss = simsiam_loss(p1, p2, z1, z2)
    expected = formulas.simsiam_loss(p1, p2, z1, z2)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (p1, p2, z1, z2), allow_unused=True)
    ref_grads = torch.autograd.grad(expected, (p1, p2, z1, z2), allow_unused=True)
    torch.testing.assert_close(grads[:2], ref_grads[:2])
    assert grads[2] is None and grads[3] is None  # stop-gradient on the projections
    torch.testing.assert_close(negative_cosine(p1, p1, reduction="none"),
                               -torch.ones(6, dtype=torch.float64))


def test_mocov3_ctr_is_scaled_info_nce():
    method = make_method("mocov3", temperature=0.3)
    q, k = _float64(7, 5, 0), _float64(7, 5, 1)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.3
    expected = F.cross_entropy(logits, torch.arange(7)) * 2 * 0.3
    torch.testing.assert_close(method.contrastive(q, k), expected)


def test_mocov1_loss_and_queue():
    torch.manual_seed(0)
    method = make_method("mocov1", queue_size=40, temperature=0.1)
    images, g = uint8_images(8)
    views = method.augment(images, g)
    method.eval()  # running BN statistics: q and k can be recomputed exactly
    loss = method(views)
    with torch.no_grad():
        q = F.normalize(method.head(method.backbone(views[0])).double(), dim=1)
        k = F.normalize(method.key_encoder(views[1]).double(), dim=1)
        queue = method.queue.tensor.double()
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.1
        expected = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert int(method.queue.pointer) == 0  # eval: nothing enqueued
    method.train()
    before = method.queue.tensor.clone()
    method(views)
    assert int(method.queue.pointer) == 8
    assert not torch.equal(method.queue.tensor[:8], before[:8])
    torch.testing.assert_close(method.queue.tensor[8:], before[8:])
    torch.testing.assert_close(method.queue.tensor[:8].norm(dim=1), torch.ones(8))


def test_dino_loss_matches_official_formula():
    torch.manual_seed(0)
    method = make_method("dino", image_size=16, out_dim=32, num_local_crops=2, centering="ema",
                     student_temp=0.1, warmup_teacher_temp_epochs=4)
    images, g = uint8_images(6, side=16)
    views = method.augment(images, g)
    assert [v.shape[-1] for v in views] == [16, 16, 7, 7]
    method.eval()
    loss = method(views, epoch=1)
    with torch.no_grad():
        student = torch.stack([method.head(method.backbone(v)) for v in views]).double()
        teacher = torch.stack([method.teacher(v) for v in views[:2]]).double()
    temperature = 0.04 + (0.07 - 0.04) / 3  # epoch 1 of a 4-epoch linear warm-up
    expected = formulas.dino_loss(student, teacher, torch.zeros(1, 32, dtype=torch.float64), 0.1,
                                  temperature)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    # The center moved towards the teacher's mean.
    torch.testing.assert_close(method.criterion.center.double(),
                               0.1 * teacher.reshape(-1, 32).mean(0, keepdim=True),
                               rtol=1e-4, atol=1e-6)


def test_dino_sinkhorn_centering_by_default():
    """The default loss: Sinkhorn-Knopp codes of both global crops' teacher outputs (together,
    epsilon = the teacher temperature) against the student at tau_s 0.2; no local crops on
    8 px images; the center is not used."""
    torch.manual_seed(0)
    method = make_method("dino", out_dim=32)
    images, g = uint8_images(6)
    views = method.augment(images, g)
    assert [v.shape[-1] for v in views] == [8, 8]
    method.eval()
    loss = method(views, epoch=0)
    with torch.no_grad():
        student = torch.stack([method.head(method.backbone(v)) for v in views]).double()
        teacher = torch.stack([method.teacher(v) for v in views]).double()
    codes = fastcl.sinkhorn(teacher.reshape(12, 32), epsilon=0.04).view(2, 6, 32)
    log_q = torch.log_softmax(student / 0.2, dim=-1)
    expected = -((codes[0] * log_q[1]).sum(-1).mean() + (codes[1] * log_q[0]).sum(-1).mean()) / 2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(method.criterion.center, torch.zeros(1, 32))
    assert any(isinstance(m, nn.BatchNorm1d) for m in method.head.mlp)
    assert not any(isinstance(m, nn.BatchNorm1d)
                   for m in make_method("dino", out_dim=32, bn_in_head=0).head.mlp)


def test_dino_loss_module_backward_after_center_update():
    student = torch.randn(3, 4, 8, requires_grad=True)
    loss = DINOLoss(8)(student, torch.randn(2, 4, 8))
    loss.backward()  # the center update must not invalidate the saved center
    assert torch.isfinite(student.grad).all()


# ----------------------------------------------------------------------------------------------
# Momentum encoders, schedules, shuffle BN
# ----------------------------------------------------------------------------------------------
def _fill(module, value):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


@pytest.mark.parametrize("name, target, online, schedule", [
    ("mocov1", "key_encoder", ("backbone", "head"), lambda step, total: 0.9),
    ("mocov3", "momentum_encoder", ("backbone", "projector"),
     lambda step, total: 1 - (1 + math.cos(math.pi * (step + 1) / total)) / 2 * (1 - 0.9)),
    ("simclrv2", "memory_encoder", ("backbone", "projector"), lambda step, total: 0.9),
    ("dino", "teacher", ("backbone", "head"),
     lambda step, total: 1 - (1 + math.cos(math.pi * step / total)) / 2 * (1 - 0.9)),
])
def test_momentum_encoder_update(name, target, online, schedule):
    momentum_name = {"mocov1": "momentum", "mocov3": "momentum", "simclrv2": "memory_momentum",
                     "dino": "teacher_momentum"}[name]
    extra = {"memory_size": 64} if name == "simclrv2" else {}
    method = make_method(name, **{momentum_name: 0.9}, **extra)
    encoder = getattr(method, target)
    assert not any(p.requires_grad for p in encoder.parameters())
    _fill(encoder, 0.0)
    for part in online:
        _fill(getattr(method, part), 1.0)
    method.after_step(3, 10)
    m = schedule(3, 10)
    for p in encoder.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1 - m))


def test_shuffled_bn_forward():
    x = torch.randn(12, 5)
    linear = nn.Linear(5, 3)  # no batch statistics: the order is undone exactly
    torch.testing.assert_close(shuffled_bn_forward(linear, x, 4, False), linear(x))
    bn = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    keys = shuffled_bn_forward(bn, x, 3, False)
    bn_copy = bn
    for j in range(3):  # group j: rows j, j + 3, ..., normalized with their own statistics
        torch.testing.assert_close(keys[j::3], bn_copy(x[j::3]))
    assert not torch.allclose(keys, bn(x), atol=1e-3)
    torch.testing.assert_close(shuffled_bn_forward(bn, x, 1, False), bn(x))


# ----------------------------------------------------------------------------------------------
# Variants and training steps
# ----------------------------------------------------------------------------------------------
# The defaults of every method (ResNet) train in tests/methods/test_methods.py; here the other variants.
@pytest.mark.parametrize("name, backbone, hparams", [
    ("mocov1", "resnet18", dict(queue_size=16)),
    ("mocov3", "vit_small", {}),
    ("simclrv2", "resnet18", dict(memory_size=64)),
    ("dino", "vit_small", dict(out_dim=64, num_local_crops=2)),
])
def test_training_steps_decrease_the_loss(name, backbone, hparams):
    torch.manual_seed(0)
    method = make_method(name, backbone=backbone, **hparams)
    losses = _fit(method, steps=8)
    assert all(math.isfinite(v) for v in losses), losses
    # From step 1: step 0 meets a random queue / memory, later steps the batch's own keys.
    assert sum(losses[-3:]) < sum(losses[1:4]), losses


def test_mocov3_vit_variant():
    method = make_method("mocov3", backbone="vit_small")
    assert not method.backbone.embed.weight.requires_grad  # frozen random patch projection
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and isinstance(method.predictor[-1], nn.BatchNorm1d)
    images, g = uint8_images(4)
    method(method.augment(images, g)).backward()
    assert method.backbone.embed.weight.grad is None
    assert method.backbone.blocks[0].mlp[0].weight.grad is not None
    resnet = make_method("mocov3")
    assert len([m for m in resnet.projector if isinstance(m, nn.Linear)]) == 2
    assert isinstance(resnet.predictor[-1], nn.Linear)
    assert len([m for m in make_method("mocov3", proj_layers=3).projector
                if isinstance(m, nn.Linear)]) == 3
    assert make_method("mocov3", backbone="vit_small", freeze_patch_projection=0).backbone.embed.weight \
        .requires_grad


def test_dino_last_layer_frozen_in_first_epoch_and_normalized():
    torch.manual_seed(0)
    method = make_method("dino", out_dim=64, num_local_crops=1)
    before = method.head.last_layer.weight.detach().clone()
    _fit(method, steps=2, epoch=0)
    torch.testing.assert_close(method.head.last_layer.weight, before)
    _fit(method, steps=2, epoch=1)
    assert not torch.allclose(method.head.last_layer.weight, before)
    assert not method.head.last_norm.requires_grad
    assert make_method("dino", out_dim=64, norm_last_layer=0).head.last_norm.requires_grad


def test_dino_gradient_clipping():
    method = make_method("dino", out_dim=64, num_local_crops=0, clip_grad=1e-3)
    images, g = uint8_images(8)
    method(method.augment(images, g), epoch=1).backward()
    method.after_backward(1)
    for p in method.parameters():
        if p.grad is not None:
            assert p.grad.norm() <= 1e-3 * (1 + 1e-4)


def test_simsiam_fixed_predictor_lr():
    method = make_method("simsiam")
    optimizer = build_optimizer("sgd", method, lr=0.5, weight_decay=1e-4)
    set_lr(optimizer, 0.01)
    predictor = {id(p) for p in method.predictor.parameters()}
    for group in optimizer.param_groups:
        fixed = {id(p) for p in group["params"]} <= predictor and group.get("fixed_lr", False)
        assert group["lr"] == (0.5 if fixed else 0.01)
    assert sum(len(g["params"]) for g in optimizer.param_groups if g.get("fixed_lr")) == \
        len(predictor)
    scheduled = build_optimizer("sgd", make_method("simsiam", fixed_predictor_lr=0), lr=0.5,
                                weight_decay=1e-4)
    assert not any(g.get("fixed_lr") for g in scheduled.param_groups)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, hparams, match", [
    ("mocov1", dict(queue_size=0), "queue_size"),
    ("mocov1", dict(momentum=1.5), "momentum"),
    ("mocov1", dict(bn_groups=0), "bn_groups"),
    ("mocov3", dict(proj_layers=4), "proj_layers"),
    ("mocov3", dict(momentum=-0.1), "momentum"),
    ("simclrv2", dict(memory_size=-1), "memory_size"),
    ("simclrv2", dict(memory_momentum=2.0), "memory_momentum"),
    ("simsiam", dict(fixed_predictor_lr=2), "fixed_predictor_lr"),
    ("dino", dict(norm_last_layer=2), "norm_last_layer"),
    ("dino", dict(num_local_crops=-1), "num_local_crops"),
    ("dino", dict(teacher_momentum=1.1), "teacher_momentum"),
    ("dino", dict(centering="mean"), "centering"),
    ("dino", dict(bn_in_head=2), "bn_in_head"),
    ("dino", dict(clip_grad=-1.0), "clip_grad"),
    ("dino", dict(temprature=0.1), "temprature"),
])
def test_bad_hparams(name, hparams, match):
    with pytest.raises(ValueError, match=match):
        make_method(name, **hparams)


def test_bad_loss_inputs():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="memory"):
        nt_xent_memory(z, z, torch.randn(5, 7))
    with pytest.raises(TypeError, match="memory"):
        nt_xent_memory(z, z, torch.zeros(5, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        simsiam_loss(z, z, z, torch.randn(4, 7))
    with pytest.raises(ValueError, match="reduction"):
        negative_cosine(z, z, reduction="avg")
