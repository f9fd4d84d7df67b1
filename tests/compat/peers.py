"""The peers' loss classes and the comparison of an adapter with its peer's class.

The peers are loaded without their packages' __init__ where that imports torchvision
(never installed here): open_clip/loss.py from its file; lightly's loss modules under bare package
modules, with a stand-in torchvision.ops.StochasticDepth (lightly.models.utils imports it), all in
sys.modules only while they load. Each loader skips the test when its peer is not installed."""
import functools
import importlib
import importlib.util
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.helpers import assert_close


def _root(package: str) -> str:
    spec = importlib.util.find_spec(package)  # a top-level package: its __init__ does not run
    if spec is None:
        pytest.skip(f"{package} is not installed")
    return os.path.dirname(spec.origin)


@functools.lru_cache(maxsize=None)
def open_clip_loss():
    """open_clip's loss module (open_clip.loss)."""
    spec = importlib.util.spec_from_file_location("open_clip_loss",
                                                  os.path.join(_root("open_clip"), "loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def lightly_loss():
    """lightly's NTXentLoss, DINOLoss, SwaVLoss, NegativeCosineSimilarity and the Center module."""
    root = _root("lightly")
    before = set(sys.modules)
    try:
        for name in ["lightly", "lightly.models", "lightly.models.modules", "lightly.utils",
                     "lightly.loss", "torchvision"]:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, *name.split(".")[1:])] if name != "torchvision" else []
            sys.modules[name] = package
        ops = types.ModuleType("torchvision.ops")
        ops.StochasticDepth = nn.Identity
        sys.modules["torchvision.ops"] = ops
        load = importlib.import_module
        return SimpleNamespace(
            NTXentLoss=load("lightly.loss.ntx_ent_loss").NTXentLoss,
            DINOLoss=load("lightly.loss.dino_loss").DINOLoss,
            SwaVLoss=load("lightly.loss.swav_loss").SwaVLoss,
            NegativeCosineSimilarity=load("lightly.loss.negative_cosine_similarity")
            .NegativeCosineSimilarity,
            Center=load("lightly.models.modules.center").Center,
        )
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


# ----------------------------------------------------------------------------------------------
# Comparing an adapter with its peer
# ----------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Loss and gradients against the peer in float64 on the same rounded inputs: fastcl accumulates
# in fp32 and rounds the gradients to the input dtype once.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def compare(adapter, peer, inputs, dtype, what, *, grads=True, detached=()):
    """adapter(*inputs in dtype) against peer(*the same values in float64): the loss, and the
    gradients of the inputs (all but those at the indices `detached`) under a random upstream
    gradient. Returns the two losses."""
    xs = [x.detach().to(dtype, copy=True).requires_grad_(grads and i not in detached)
          for i, x in enumerate(inputs)]
    ys = [x.detach().double().requires_grad_(x.requires_grad) for x in xs]
    actual, expected = adapter(*xs), peer(*ys)
    assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    assert_close(actual, expected, TOL[dtype], f"{what}: loss")
    if grads:
        upstream = torch.randn((), dtype=torch.float64)
        xs = [x for x in xs if x.requires_grad]
        ys = [y for y in ys if y.requires_grad]
        # An input the loss does not use (a crop paired with no other) has no gradient: zeros.
        grads_of = lambda loss, inputs: [torch.zeros_like(x) if g is None else g for x, g in zip(
            inputs, torch.autograd.grad(loss, inputs, allow_unused=True))]
        for i, (ga, ge) in enumerate(zip(grads_of(actual * upstream.float(), xs),
                                         grads_of(expected * upstream, ys))):
            assert ga.dtype == dtype, what
            assert_close(ga, ge, TOL[dtype], f"{what}: gradient of input {i}")
    return actual, expected
