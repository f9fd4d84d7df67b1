"""Training-step throughput: images/s of a whole step of each method (augment, forward, loss,
backward, optimizer step, momentum encoder / queue / bank updates) with fastcl's fused ops
against the same method, model and batch with the naive loss formulas of fastcl/formulas.py (what
lightly and solo-learn compute) and a per-parameter momentum loop, through benchmarks/harness.py.

    python benchmarks/train_step.py                     # the trainer's defaults on the digits
    python benchmarks/train_step.py --quick              # batch 8, 1/8 width (smoke test)
    python benchmarks/train_step.py --only mocov2 --repeats 5 --csv out.csv

Each method is built as the trainer builds it (its DEFAULTS: ResNet-18 x0.5, batch 128, its
optimizer) for the embedded digits (1 x 8 x 8, 1438 training images); both implementations step
one copy of it each, from the same weights and the same batch, interleaved round by round
(harness.py's train pattern: ``train_ms`` a median step, ``train_speedup`` naive / fastcl per
round; the call pattern steps one shared copy). ``images_per_s`` is the batch over train_ms.
What the naive side swaps in: the method's loss (nt_xent, info_nce, supcon, DINO's loss with its
center, SwAV's Sinkhorn, InstDisc's sampled_info_nce: formulas.py) and fastcl.momentum_update (a
loop over the parameters, MoCo's); the rest of the step is the same code.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch import nn

import fastcl
from fastcl import formulas
from fastcl.optim import build_optimizer
from fastcl.train import TrainConfig, build_method
from harness import Case, bench_main

METHODS = ["simclr", "mocov2", "mocov3", "byol", "simsiam", "swav", "dino", "supcon", "instdisc"]
CHANNELS, SIDE, NUM_ITEMS = 1, 8, 1438  # the embedded digits


@torch.no_grad()
def naive_momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """MoCo's loop: p_t <- m p_t + (1 - m) p_o, one parameter at a time."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(momentum).add_(p_o.detach(), alpha=1 - momentum)


class NaiveLoss(nn.Module):
    """A method's criterion computed by the formula `fn` of formulas.py (same call signature)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _naive_dino(criterion):
    """DINOLoss(student, teacher, epoch) through formulas.dino_loss(_sinkhorn), center included."""
    def loss(student, teacher, epoch=None):
        temp = criterion.teacher_temperature(epoch)
        if criterion.centering == "sinkhorn":
            return formulas.dino_loss_sinkhorn(student, teacher, criterion.student_temp, temp,
                                               criterion.sinkhorn_iterations)
        value = formulas.dino_loss(student, teacher, criterion.center, criterion.student_temp,
                                   temp)
        with torch.no_grad():
            batch_center = teacher.reshape(-1, teacher.shape[-1]).mean(0, keepdim=True)
            m = criterion.center_momentum
            criterion.center.mul_(m).add_(batch_center * (1 - m))
        return value
    return loss


def _naive_supcon(temperature, base_temperature):
    """SupConLoss(z (B, V, D), labels) through formulas.supcon over the V B views."""
    def loss(z, labels=None):
        views = z.shape[1]
        labels = torch.arange(z.shape[0]) if labels is None else labels
        value = formulas.supcon(z.transpose(0, 1).reshape(-1, z.shape[-1]), labels.repeat(views),
                                temperature)
        return value * (temperature / base_temperature) if base_temperature else value
    return loss


def naive_criterion(method: nn.Module):
    """The method's criterion as the formula of formulas.py (None: it has no fused one)."""
    hp, criterion = method.hparams, getattr(method, "criterion", None)
    if method.name == "simclr":
        return NaiveLoss(lambda z1, z2: formulas.nt_xent(z1, z2, hp["temperature"]))
    if method.name in ("mocov2", "mocov3"):
        return NaiveLoss(lambda q, k, queue=None: formulas.info_nce(q, k, queue,
                                                                    hp["temperature"]))
    if method.name == "supcon":
        return NaiveLoss(_naive_supcon(hp["temperature"], hp["base_temperature"]))
    if method.name == "dino":
        return NaiveLoss(_naive_dino(criterion))
    return None


@contextlib.contextmanager
def naive_ops(method: nn.Module):
    """Within: the method's criterion is the naive formula, and fastcl's fused functions the
    methods call through the package (Sinkhorn, sampled InfoNCE, the momentum update) are the
    formulas and MoCo's per-parameter loop; all restored on exit."""
    saved = {name: getattr(fastcl, name) for name in
             ("sinkhorn", "sampled_info_nce", "momentum_update")}
    criterion, naive = getattr(method, "criterion", None), naive_criterion(method)
    fastcl.sinkhorn = lambda s, epsilon, iterations, gather=False: formulas.sinkhorn(
        s, epsilon, iterations)
    fastcl.sampled_info_nce = formulas.sampled_info_nce
    fastcl.momentum_update = naive_momentum_update
    if naive is not None:
        method.criterion = naive
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(fastcl, name, fn)
        if naive is not None:
            method.criterion = criterion


def training_step(naive: bool, *, bf16: bool = False, channels_last: bool = False):
    """fn(method, optimizer, images, labels, indices, state): one whole step of the trainer.
    bf16: the forward and loss under torch.autocast(bfloat16), as the trainer's --precision bf16;
    channels_last: the image views handed to the encoder in channels-last layout (the method's
    weights converted by the caller)."""
    def step(method, optimizer, images, labels, indices, state):
        with naive_ops(method) if naive else contextlib.nullcontext():
            views = method.augment(images, state["g"])
            if channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                         for v in views]  # images; InstDisc's drawn bank rows stay as they are
            extras = {"labels": labels, "indices": indices}
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = method(views, epoch=1, **{k: extras[k] for k in method.batch_extras})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(1)
            optimizer.step()
            method.after_step(state["step"], 1000)
            state["step"] += 1
    return step


def build(name: str, quick: bool = False, *, backbone: nn.Module | None = None,
          channels: int = CHANNELS, side: int = SIDE, batch_size: int | None = None,
          hparams: dict | None = None, num_items: int = NUM_ITEMS) -> tuple[nn.Module, TrainConfig]:
    """The method as the trainer builds it: for the digits (quick: batch 8, 1/8 width), or on
    `backbone` for channels x side x side images, `hparams` replacing the method's defaults."""
    cfg = TrainConfig(method=name, width=0.125 if quick else None,
                      batch_size=8 if quick else batch_size, hparams=hparams or {}).resolved()
    torch.manual_seed(0)
    method = build_method(cfg, channels, side, [0.3] * channels, [0.2] * channels,
                          num_items=num_items, backbone=backbone)
    return method.train(), cfg


def batch(cfg: TrainConfig, channels: int, side: int, num_items: int, device) -> list:
    """[images (B, C, side, side) uint8, labels (B,) of 10 classes, indices (B,) distinct rows of
    num_items], the same for every call, on device."""
    g = torch.Generator().manual_seed(0)
    b = cfg.batch_size
    images = (torch.rand(b, channels, side, side, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (b,), generator=g)
    indices = torch.randperm(num_items, generator=g)[:b]
    return [t.to(device) for t in (images, labels, indices)]


def fresh_state(method: nn.Module, cfg: TrainConfig, inputs: list) -> list:
    """The arguments of a training_step: a copy of method (every implementation starts from the
    same state), its optimizer, the batch `inputs` and the step state (augmentation generator)."""
    m = copy.deepcopy(method)
    optimizer = build_optimizer(cfg.optimizer, m, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"g": torch.Generator(device=inputs[0].device).manual_seed(1), "step": 0}
    return [m, optimizer, *inputs, state]


def cases(device, quick):
    for name in METHODS:
        method, cfg = build(name, quick)
        method.to(device)
        inputs = batch(cfg, CHANNELS, SIDE, NUM_ITEMS, device)
        yield Case(f"{name} B={cfg.batch_size} {cfg.backbone} x{cfg.width}",
                   functools.partial(fresh_state, method, cfg, inputs),
                   {"fastcl": training_step(False), "naive": training_step(True)},
                   baseline="naive", backward=False, compile=(),
                   extra={"batch": cfg.batch_size})


if __name__ == "__main__":
    rows = bench_main(__doc__.split("\n")[0], cases, "fastcl training steps", default_repeats=3)
    for r in rows:
        print(f"{r['case']:<36} {r['impl']:<7} {r['batch'] / r['train_ms'] * 1e3:8.0f} images/s "
              f"speed-up {r['train_speedup']:.2f} ({r['train_speedup_min']:.2f}-"
              f"{r['train_speedup_max']:.2f})")
