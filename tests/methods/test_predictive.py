"""InvaSpread and CPC v2: InvaSpread's loss against its formula (values and anchor-side gradients),
CPC's patch grid, masked context and loss against the dense formula, a few training steps, and
bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from fastcl import formulas
from fastcl.augment import random_resized_crop
from fastcl.losses.invaspread import InvaSpreadLoss, invaspread
from fastcl.methods import get_method
from fastcl.methods.cpc import ContextNetwork, patch_geometry, to_patches
from fastcl.models import build_backbone
from tests.helpers import assert_decreasing, make_method, train_on_batch


def _images(n=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth random images (a blurred, upsampled 4x4 grid): structure a patch can predict.
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    images = F.interpolate(coarse, size=8, mode="bilinear", align_corners=False)
    return (images * 255).to(torch.uint8), g


def _fit(method, steps=8, channels=1):
    images, g = _images(channels=channels)
    views = method.augment(images, g)
    return train_on_batch(method, views, steps, epoch=0, lr=3e-3)



# ---------------------------------------------------------------------------------------------
# InvaSpread loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, d", [(2, 3), (5, 7), (33, 16)])
@pytest.mark.parametrize("normalize", [True, False])
def test_invaspread_matches_formula_float64(n, d, normalize):
    g = torch.Generator().manual_seed(n)
    scale = 0.3 if normalize else 0.05  # raw rows: keep exp(s) away from overflow
    z1 = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).requires_grad_()
    z2 = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).requires_grad_()
    temperature = 0.25  # exact in float32, the scale's dtype
    for reduction in ("mean", "sum", "none"):
        got = invaspread(z1, z2, temperature, normalize=normalize, reduction=reduction)
        want = formulas.invaspread(z1, z2, temperature, normalize=normalize, reduction=reduction)
        torch.testing.assert_close(got, want)
    upstream = torch.randn(2 * n, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((invaspread(z1, z2, temperature, normalize=normalize,
                                          reduction="none") * upstream).sum(), (z1, z2))
    want = torch.autograd.grad((formulas.invaspread(z1, z2, temperature, normalize=normalize,
                                                    reduction="none") * upstream).sum(), (z1, z2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_invaspread_gradient_flows_through_the_anchor_side_only():
    """Anchor a's loss changes f_a's gradient only: the other rows are constants."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    per_anchor = invaspread(z1, z2, reduction="none")
    grad1, grad2 = torch.autograd.grad(per_anchor[1], (z1, z2))
    assert grad1[1].abs().sum() > 0
    assert grad1[[0, 2, 3]].abs().sum() == 0 and grad2.abs().sum() == 0


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2),
                                        (torch.float16, 1e-2)])
def test_invaspread_low_precision(dtype, tol):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 19, 32, generator=g)
    z1, z2 = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
    got = invaspread(z1, z2, 0.1)
    want = formulas.invaspread(z1.double(), z2.double(), 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    got.backward()
    assert z1.grad.dtype == dtype and torch.isfinite(z1.grad.float()).all()


def _assert_invaspread_matches_float64(z1, z2, temperature, g, loss_scale=1.0):
    """Loss and gradient (reduction="none", random upstream times loss_scale, as AMP's GradScaler
    would scale it) against the float64 formula on the same inputs: close in fp32, finite and
    aligned (cosine >= 0.99) from 16-bit inputs."""
    dtype = z1.dtype
    z1, z2 = z1.requires_grad_(), z2.requires_grad_()
    w1, w2 = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    upstream = torch.randn(2 * z1.shape[0], generator=g, dtype=torch.float64) * loss_scale
    got = invaspread(z1, z2, temperature, reduction="none")
    want = formulas.invaspread(w1, w2, temperature, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)
    got = torch.autograd.grad((got * upstream.float()).sum(), (z1, z2))
    want = torch.autograd.grad((want * upstream).sum(), (w1, w2))
    got = torch.cat([x.double().flatten() for x in got])
    want = torch.cat([x.flatten() for x in want])
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        assert (got - want).norm() <= 1e-4 * want.norm()
    else:
        assert F.cosine_similarity(got, want, dim=0) >= 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_invaspread_exact_when_the_positive_takes_all_the_mass(dtype):
    """Near-duplicate views at tau = 0.05 (N = 64, D = 128): each anchor's positive takes all but
    ~1e-6 of its softmax mass, so the loss and its gradient are ~1e-6 (1 - P_a taken as a
    difference is 0 or noise: -inf and a NaN gradient)."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        z1 = torch.randn(64, 128, generator=g)
        z2 = z1 + 0.05 * torch.randn(64, 128, generator=g)
        assert formulas.invaspread(z1.double(), z2.double(), 0.05, reduction="none").max() < 1e-5
        # Scaled: fp16 gradients of ~1e-7 would be subnormal.
        _assert_invaspread_matches_float64(z1.to(dtype), z2.to(dtype), 0.05, g, 2.0 ** 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_invaspread_exact_when_a_negative_takes_all_the_mass(dtype):
    """Two near-duplicate images in the batch, unrelated views: for their anchors a negative takes
    almost all the mass, and 1 - s_ak / D_a ~ 1e-8 must come from the other terms."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        z1, z2 = torch.randn(2, 16, 128, generator=g)
        z1[1] = z1[0] + 0.05 * torch.randn(128, generator=g)
        _assert_invaspread_matches_float64(z1.to(dtype), z2.to(dtype), 0.05, g)


def test_invaspread_errors():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="N >= 2"):
        invaspread(z[:1], z[:1])
    with pytest.raises(ValueError, match="same shape"):
        invaspread(z, z[:3])
    with pytest.raises(ValueError, match="reduction"):
        invaspread(z, z, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        InvaSpreadLoss(0.0)
    with pytest.raises(TypeError, match="z2"):
        invaspread(z, z.long())


# ---------------------------------------------------------------------------------------------
# InvaSpread method
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["invaspread", "nt_xent"])
def test_invaspread_method_loss_is_the_formula(loss):
    method = make_method("invaspread", loss=loss)
    images, g = _images(8)
    views = method.augment(images, g)
    z1, z2 = (method.head(method.backbone(v)).double() for v in views)
    want = (formulas.invaspread(z1, z2, 0.1) if loss == "invaspread"
            else formulas.nt_xent(z1, z2, 0.1))
    torch.testing.assert_close(method(views).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["invaspread", "nt_xent"])
def test_invaspread_method_trains(loss):
    assert_decreasing(_fit(make_method("invaspread", loss=loss)))


def test_invaspread_method_errors():
    with pytest.raises(ValueError, match="loss"):
        make_method("invaspread", loss="spread")


# ---------------------------------------------------------------------------------------------
# CPC v2
# ---------------------------------------------------------------------------------------------
def test_patch_grid():
    assert patch_geometry(8, 3) == (4, 2)
    assert patch_geometry(256, 7) == (64, 32)  # CPC's 7 x 7 patches of 64 px at 256 px
    assert patch_geometry(32, 7) == (8, 4)
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    patches = to_patches(x, 4, 2)
    assert patches.shape == (2, 3, 3, 1, 4, 4)
    torch.testing.assert_close(patches[1, 2, 1, 0], x[1, 0, 4:8, 2:6])
    with pytest.raises(ValueError, match="grid"):
        patch_geometry(8, 8)
    with pytest.raises(ValueError, match="grid"):
        patch_geometry(8, 1)


def test_context_sees_rows_above_only():
    torch.manual_seed(0)
    context = ContextNetwork(6, layers=3)
    z = torch.randn(2, 6, 5, 5)
    changed = z.clone()
    changed[:, :, 3:] = torch.randn(2, 6, 2, 5)  # rows 3 and 4 change
    c, c_changed = context(z), context(changed)
    torch.testing.assert_close(c[:, :, :3], c_changed[:, :, :3])
    assert not torch.allclose(c[:, :, 3:], c_changed[:, :, 3:])


def test_cpc_encoder_uses_layer_norm_and_pools_patches():
    method = make_method("cpc")
    kinds = {type(m).__name__ for m in method.modules()}
    assert "BatchNorm2d" not in kinds and "GroupNorm" in kinds
    x = torch.randn(3, 1, 8, 8)
    features = method.backbone(x)
    assert features.shape == (3, method.backbone.out_dim)
    # 8 px images are upsampled to 16 px: a 3 x 3 grid of 8 px patches.
    patches = method.backbone.patches(x)
    assert patches.shape == (3, 3, 3, 1, 8, 8)
    z = method.backbone.encode_patches(patches)
    torch.testing.assert_close(features, z.mean(dim=(2, 3)))
    # Each patch feature is layer-normalized over its channels (no shared offset).
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(3, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(dim=1, unbiased=False), torch.ones(3, 3, 3), atol=1e-3,
                               rtol=0)
    images, g = _images(4)
    view, = method.augment(images, g)
    assert view.shape == (4, 3, 3, 1, 8, 8)


@pytest.mark.parametrize("side, channels", [(8, 1), (16, 3)])
def test_cpc_evaluation_patches_are_trainings_without_randomness(side, channels):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=channels, image_size=side, width=0.125)
    method = get_method("cpc")(backbone, image_size=side, mean=[0.3] * channels,
                               std=[0.4] * channels)
    assert method.backbone.side == 16 and method.recipes[0].size == 16
    x = torch.rand(2, channels, side, side)
    # augment's image step with a full, square, unflipped crop, cut as augment cuts it.
    g = torch.Generator().manual_seed(0)
    full = random_resized_crop(x, method.recipes[0].size, g, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                               flip_p=0.0)
    want = to_patches(full, method.backbone.patch, method.backbone.stride)
    torch.testing.assert_close(method.backbone.patches(x), want, atol=1e-5, rtol=1e-5)
    assert method.recipes[1].size == method.backbone.patch == 8


@pytest.mark.parametrize("directions", [1, 4])
def test_cpc_loss_is_the_formula(directions):
    method = make_method("cpc", directions=directions)
    images, g = _images(6)
    view, = method.augment(images, g)
    got = method([view])
    z = method.backbone.encode_patches(view).double()
    predictors = method.predictors.double()
    want = []
    for r in range(directions):
        zr = torch.rot90(z, r, dims=(2, 3))
        c = method.context.double()(zr)
        for k in (1, 2):
            pred = torch.einsum("bdij,de->bije", c[:, :, :-k], predictors[r, k - 1])
            target = zr[:, :, k:].permute(0, 2, 3, 1)
            logits = pred.reshape(-1, pred.shape[-1]) @ target.reshape(-1, target.shape[-1]).T
            want.append(F.cross_entropy(logits, torch.arange(logits.shape[0])))
    torch.testing.assert_close(got.double(), torch.stack(want).mean(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_cpc_trains(channels):
    assert_decreasing(_fit(make_method("cpc", channels=channels), channels=channels))


def test_cpc_errors():
    with pytest.raises(ValueError, match="steps"):
        make_method("cpc", steps=3)
    with pytest.raises(ValueError, match="directions"):
        make_method("cpc", directions=2)
    with pytest.raises(ValueError, match="grid"):
        make_method("cpc", grid=16)  # 2 px patches at 16 px need side >= 17
    with pytest.raises(ValueError, match="context_layers"):
        make_method("cpc", context_layers=0)
