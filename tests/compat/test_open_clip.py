"""fastcl.compat.open_clip's ClipLoss and SigLipLoss against open_clip's (open_clip/loss.py):
values and gradients (features, learnable logit_scale and logit_bias) in fp32 / bf16 / fp16,
output_dict, the options they refuse, and their distributed options in 2 gloo processes.

open_clip's own tests of its losses: tests/test_loss.py tests its all-gather helpers only (no
ClipLoss case to port); tests/test_siglip_chunked_loss.py's inputs (B = 64 and the uneven 70,
D = 32, scale 10, bias -10) run in test_siglip_equals_open_clip."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastcl.compat.open_clip import ClipLoss, SigLipLoss
from tests.compat.peers import DTYPES, compare, open_clip_loss
from tests.helpers import assert_close, run_on_ranks


def _features(n, d):
    return F.normalize(torch.randn(n, d), dim=1), F.normalize(torch.randn(n, d), dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, scale", [(7, 13, 14.3), (2, 3, 1.0), (37, 70, 100.0)])
def test_equals_open_clip(dtype, n, d, scale):
    peer = open_clip_loss().ClipLoss()
    image, text = _features(n, d)
    # logit_scale a learnable 0-dim tensor: its gradient is compared too
    compare(ClipLoss(), peer, [image, text, torch.tensor(scale)], dtype, f"ClipLoss {dtype}")
    # near-duplicate pairs at a large scale: a small loss
    compare(ClipLoss(), peer, [image, F.normalize(image + 1e-3 * text, dim=1),
                               torch.tensor(100.0)], dtype, f"ClipLoss near-duplicates {dtype}")


def test_logit_bias_float_scale_and_output_dict():
    peer = open_clip_loss().ClipLoss()
    image, text = _features(9, 5)
    bias = torch.tensor(-2.5, requires_grad=True)
    ours = ClipLoss()(image, text, 20.0, bias, output_dict=True)
    theirs = peer(image.double(), text.double(), 20.0, bias.double(), output_dict=True)
    assert ours.keys() == theirs.keys() == {"contrastive_loss"}
    assert_close(ours["contrastive_loss"], theirs["contrastive_loss"], 2e-6, "loss")
    (grad,) = torch.autograd.grad(ours["contrastive_loss"], bias)
    assert grad.item() == 0.0  # the bias cancels in the softmax; open_clip's gradient is 0 too


def test_one_element_logit_scale():
    image, text = _features(6, 4)
    scale = torch.full((1,), 10.0, requires_grad=True)
    loss = ClipLoss()(image, text, scale)
    assert_close(loss, open_clip_loss().ClipLoss()(image, text, scale.detach()), 2e-6, "loss")
    loss.backward()
    assert scale.grad.shape == (1,)


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="gather_with_grad=True"):
        ClipLoss(local_loss=True, gather_with_grad=False, world_size=2)
    image, text = _features(4, 3)
    with pytest.raises(ValueError, match="world_size=2"):
        ClipLoss(rank=0, world_size=2)(image, text, 10.0)  # no process group
    with pytest.raises(ValueError, match="logit_scale"):
        ClipLoss()(image, text, torch.ones(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, scale, bias", [(64, 32, 10.0, -10.0), (70, 32, 10.0, -10.0),
                                               (7, 13, 3.0, 0.5), (2, 3, 1.0, -1.0)])
def test_siglip_equals_open_clip(dtype, n, d, scale, bias):
    peer = open_clip_loss().SigLipLoss()
    image, text = _features(n, d)
    compare(SigLipLoss(), peer, [image, text, torch.tensor(scale), torch.tensor(bias)], dtype,
            f"SigLipLoss {dtype}")


def test_siglip_options():
    peer = open_clip_loss().SigLipLoss()
    image, text = _features(5, 4)
    ours = SigLipLoss(cache_labels=True)(image, text, 10.0, -3.0, output_dict=True)
    theirs = peer(image.double(), text.double(), 10.0, -3.0, output_dict=True)
    assert ours.keys() == theirs.keys() == {"contrastive_loss"}
    assert_close(ours["contrastive_loss"], theirs["contrastive_loss"], 2e-6, "loss")
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="world_size=2"):
        SigLipLoss(rank=1, world_size=2)(image, text, 10.0, -3.0)


# ----------------------------------------------------------------------------------------------
# 2 gloo processes: each rank's loss and gradients (features and logit_scale) equal open_clip's
# ----------------------------------------------------------------------------------------------
WORLD, N, D = 2, 5, 6
OPTIONS = [dict(local_loss=True, gather_with_grad=True), dict(local_loss=False,
           gather_with_grad=True), dict(local_loss=False, gather_with_grad=False)]


# SigLipLoss's dist_impls: every one is fastcl.siglip(gather=True).
OPTIONS += [dict(siglip=True, dist_impl=impl) for impl in ["bidir", "shift", "reduce", "gather"]]


def _worker(rank, results, image, text):
    peer = open_clip_loss()
    rows = slice(rank * N, (rank + 1) * N)
    for i, options in enumerate(OPTIONS):
        options = dict(options)
        siglip = options.pop("siglip", False)
        classes = [("ours", SigLipLoss), ("theirs", peer.SigLipLoss)] if siglip else [
            ("ours", ClipLoss), ("theirs", peer.ClipLoss)]
        for side, loss_class in classes:
            x = image[rows].clone().requires_grad_()
            y = text[rows].clone().requires_grad_()
            scale = torch.tensor(12.0, requires_grad=True)
            bias = torch.tensor(-4.0, requires_grad=True)
            loss = loss_class(rank=rank, world_size=WORLD, **options)(x, y, scale, bias)
            loss.backward()
            results[(i, side, rank)] = (loss.detach(), x.grad, y.grad, scale.grad,
                                        torch.zeros(()) if bias.grad is None else bias.grad)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_options_equal_open_clip():
    open_clip_loss()  # skips here when open_clip is not installed
    image, text = _features(WORLD * N, D)
    results = run_on_ranks(_worker, image, text, world=WORLD)
    for i, options in enumerate(OPTIONS):
        for rank in range(WORLD):
            ours, theirs = results[(i, "ours", rank)], results[(i, "theirs", rank)]
            for name, a, b in zip(["loss", "image grad", "text grad", "logit_scale grad",
                                   "logit_bias grad"], ours, theirs):
                assert_close(a, b, 1e-5, f"{options} rank {rank}: {name}")
