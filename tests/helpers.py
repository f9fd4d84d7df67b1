"""Helpers shared by the test modules: tolerance checks against the float64 truth, inputs, runs over
several gloo processes, and a few training steps of a method on one batch."""
import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastcl.methods import get_method
from fastcl.models import build_backbone


# ----------------------------------------------------------------------------------------------
# Comparing with the float64 truth
# ----------------------------------------------------------------------------------------------
def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(|expected|, 1), shapes equal; infinities equal on both
    sides count as no error."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not expected.numel():
        return
    both_inf = torch.isinf(expected) & (actual == expected)
    err = (actual - expected).abs().masked_fill(both_inf, 0).max().item()
    scale = expected.masked_fill(torch.isinf(expected), 0).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{what}: max error {err:.3g} (scale {scale:.3g})"


def max_error(actual, expected) -> float:
    """Largest |actual - expected| relative to max(|expected|, 1)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = max(expected.abs().max().item(), 1.0)
    return (actual - expected).abs().max().item() / scale


def unit_rows(m, d, device="cpu", dtype=torch.float32, norm=1.0):
    """(m, d) rows of length `norm`, drawn in float64 and rounded to dtype."""
    return (norm * F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1)).to(device=device,
                                                                                 dtype=dtype)


def dino_inputs(s, t, b, k, scale=3.0, dtype=torch.float64):
    """DINO student (s, b, k) / teacher (t, b, k) logits and a (1, k) center, float64 rounded to
    dtype (so both sides see the same numbers)."""
    student = (scale * torch.randn(s, b, k, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(t, b, k, dtype=torch.float64)).to(dtype)
    center = (scale * 0.5 * torch.randn(1, k, dtype=torch.float64))
    return student, teacher, center


# ----------------------------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------------------------
def run_on_ranks(worker, *args, world=2):
    """Runs worker(rank, results, *args) in `world` gloo processes on this machine; returns the
    dict the workers filled."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(world, port, worker, args, results), nprocs=world, join=True)
        return dict(results)


def _rank_main(rank, world, port, worker, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, results, *args)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Methods on one batch
# ----------------------------------------------------------------------------------------------
def make_method(name, channels=1, *, backbone="resnet18", image_size=8, **hparams):
    """Method `name` on a 1/8-width backbone for (channels, image_size, image_size) images, its
    weights drawn from seed 0."""
    torch.manual_seed(0)
    net = build_backbone(backbone, in_channels=channels, image_size=image_size, width=0.125)
    return get_method(name)(net, image_size=image_size, mean=[0.3] * channels,
                            std=[0.4] * channels, **hparams)


def uint8_images(n=16, channels=1, side=8, seed=0):
    """(n, channels, side, side) uint8 noise images and the generator that drew them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, channels, side, side, generator=g) * 255).to(torch.uint8), g


def train_on_batch(method, views, steps, *, epoch=0, lr=3e-3, **extras):
    """Adam on one fixed batch of augmented views, stepping the method as the trainer does
    (after_backward, after_step); returns the losses."""
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = method(views, epoch=epoch, **extras)
        opt.zero_grad()
        loss.backward()
        method.after_backward(epoch)
        opt.step()
        method.after_step(step, steps)
        losses.append(loss.item())
    return losses


def assert_decreasing(losses):
    """Finite losses whose last three average below their first three."""
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
