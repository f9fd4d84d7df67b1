"""SupCon and triplet: the triplet loss against its definition and pytorch-metric-learning's miners,
the methods' losses against their formulas, a few training steps, bad inputs, and one trainer run
that passes the labels (Method.batch_extras)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl import formulas
from fastcl.data import ImageData
from fastcl.losses import triplet as triplet_module
from fastcl.losses.triplet import TripletLoss, mine_triplets, pairwise_distances, triplet_margin
from fastcl.methods import get_method
from fastcl.train import TrainConfig, train
from tests.helpers import assert_decreasing, make_method, train_on_batch, uint8_images


def _batch(n=24, classes=3, seed=0):
    images, g = uint8_images(n, seed=seed)
    return images, torch.randint(0, classes, (n,), generator=g), g


def _fit(method, steps=8, **extras):
    images, labels, g = _batch()
    views = method.augment(images, g)
    extras = {k: v for k, v in dict(labels=labels, **extras).items() if k in method.batch_extras}
    return train_on_batch(method, views, steps, epoch=0, lr=3e-3, **extras)



# ---------------------------------------------------------------------------------------------
# Triplet loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
@pytest.mark.parametrize("distance", ["squared", "euclidean"])
@pytest.mark.parametrize("m, classes", [(2, 1), (7, 3), (16, 4)])
def test_triplet_matches_definition(mining, distance, m, classes):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, classes, (m,), generator=g)
    got = triplet_margin(x, labels, 0.3, mining=mining, distance=distance)
    want = formulas.triplet_margin(x, labels, 0.3, mining=mining, distance=distance)
    torch.testing.assert_close(got, want)
    if want.requires_grad and got.requires_grad:
        grad_got, = torch.autograd.grad(got, x)
        grad_want, = torch.autograd.grad(want, x)
        torch.testing.assert_close(grad_got, grad_want)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_triplet_low_precision(dtype, tol):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 16, generator=g)
    labels = torch.randint(0, 4, (20,), generator=g)
    got = triplet_margin(x.to(dtype), labels, mining="batch_hard")
    want = formulas.triplet_margin(x.to(dtype).double(), labels, mining="batch_hard")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_triplet_bf16_mines_the_float64_triplets(mining, distance, monkeypatch):
    """Random bf16 batches mine the triplets that float64 mines from the same inputs, and give its
    per-triplet losses and (random upstream) gradient; normalized in bf16, they mined other
    triplets in half (batch_hard) to all (semi_hard) of the batches."""
    mined = []

    def recording(*args):
        mined.append(torch.stack(mine_triplets(*args)))
        return mined[-1].unbind()

    monkeypatch.setattr(triplet_module, "mine_triplets", recording)
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 64, generator=g).bfloat16().requires_grad_()
        labels = torch.randint(0, 4, (32,), generator=g)
        w = x.detach().double().requires_grad_()
        got = triplet_margin(x, labels, mining=mining, distance=distance, reduction="none")
        want = triplet_margin(w, labels, mining=mining, distance=distance, reduction="none")
        assert torch.equal(mined[-2], mined[-1]), f"batch {seed}"
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
        got, = torch.autograd.grad((got * upstream.float()).sum(), x)
        want, = torch.autograd.grad((want * upstream).sum(), w)
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max())


def _pml_distance(distance):
    from pytorch_metric_learning.distances import LpDistance

    return LpDistance(normalize_embeddings=True, p=2, power=2 if distance == "squared" else 1)


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_batch_hard_matches_pytorch_metric_learning(distance):
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (32,), generator=g)
    pml_distance = _pml_distance(distance)
    triplets = BatchHardMiner(distance=pml_distance)(x, labels)
    want = TripletMarginLoss(margin=0.2, distance=pml_distance, reducer=MeanReducer())(
        x, labels, triplets)
    got = triplet_margin(x, labels, 0.2, mining="batch_hard", distance=distance)
    torch.testing.assert_close(got, want)


def test_semi_hard_picks_the_nearest_of_pytorch_metric_learning_semihard_triplets():
    """pytorch-metric-learning's semihard miner returns every triplet with
    0 < d(a, n) - d(a, p) <= margin; FaceNet's loss takes the nearest of those per positive pair."""
    from pytorch_metric_learning.miners import TripletMarginMiner

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=g)
    margin = 0.5
    a, p, n = TripletMarginMiner(margin=margin, type_of_triplets="semihard",
                                 distance=_pml_distance("squared"))(x, labels)
    dist = pairwise_distances(F.normalize(x, dim=1))
    anchor, pos, neg = mine_triplets(dist, labels, "semi_hard")
    chosen = {(i, j): dist[i, k].item() for i, j, k in zip(anchor.tolist(), pos.tolist(),
                                                          neg.tolist())}
    nearest_semihard: dict = {}
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        nearest_semihard[(i, j)] = min(nearest_semihard.get((i, j), np.inf), dist[i, k].item())
    assert len(nearest_semihard) > 20
    for pair, d_an in nearest_semihard.items():
        assert chosen[pair] == pytest.approx(d_an)
    # Pairs without a semi-hard negative pick one beyond the margin (zero loss) or, when every
    # negative is nearer than the positive, the farthest negative.
    losses = triplet_margin(x, labels, margin, reduction="none")
    for (i, j), loss in zip(zip(anchor.tolist(), pos.tolist()), losses.tolist()):
        if (i, j) not in nearest_semihard and chosen[(i, j)] > dist[i, j]:
            assert loss == 0


def test_triplet_without_triplets_is_zero_with_a_graph():
    x = torch.randn(4, 3, requires_grad=True)
    loss = triplet_margin(x, torch.zeros(4, dtype=torch.long))  # no negatives
    assert loss.item() == 0 and loss.requires_grad
    assert triplet_margin(x, torch.arange(4), reduction="none").shape == (0,)


def test_triplet_errors():
    x = torch.randn(6, 3)
    labels = torch.arange(6)
    with pytest.raises(ValueError, match="margin"):
        triplet_margin(x, labels, -0.1)
    with pytest.raises(TypeError, match="margin"):
        TripletLoss(margin="0.2")
    with pytest.raises(ValueError, match="mining"):
        triplet_margin(x, labels, mining="hardest")
    with pytest.raises(ValueError, match="distance"):
        TripletLoss(distance="cosine")
    with pytest.raises(ValueError, match="labels"):
        triplet_margin(x, labels[:5])
    with pytest.raises(TypeError, match="labels"):
        triplet_margin(x, labels.float())
    with pytest.raises(ValueError, match="embeddings"):
        triplet_margin(x[None], labels)
    with pytest.raises(ValueError, match="reduction"):
        triplet_margin(x, labels, reduction="max")


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def test_supcon_method_loss_is_the_formula():
    method = make_method("supcon", base_temperature=0.07)
    images, labels, g = _batch(8)
    views = method.augment(images, g)
    loss = method(views, labels=labels)
    z = method.projector(method.backbone(torch.cat(views))).view(2, 8, -1)  # (V, B, D), one batch
    want = formulas.supcon(z.reshape(-1, z.shape[-1]).double(), labels.repeat(2), 0.1)
    torch.testing.assert_close(loss.double(), want * 0.1 / 0.07, rtol=1e-5, atol=1e-5)
    # Without labels every image is its own class: SimCLR's NT-Xent.
    torch.testing.assert_close(method(views).double(),
                               formulas.nt_xent(z[0].double(), z[1].double(), 0.1) * 0.1 / 0.07,
                               rtol=1e-5, atol=1e-5)


def test_triplet_method_loss_is_the_formula():
    method = make_method("triplet", mining="batch_hard", distance="euclidean", margin=0.3)
    images, labels, g = _batch(8)
    views = method.augment(images, g)
    e = torch.cat([method.head(method.backbone(v)) for v in views])
    want = formulas.triplet_margin(e.double(), labels.repeat(2), 0.3, mining="batch_hard",
                                   distance="euclidean")
    torch.testing.assert_close(method(views, labels=labels).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, hparams", [
    ("supcon", {}), ("triplet", {}), ("triplet", dict(mining="batch_hard"))])
def test_supervised_methods_train(name, hparams):
    method = make_method(name, **hparams)
    assert method.batch_extras == ("labels",)
    assert_decreasing(_fit(method))


def test_supervised_method_errors():
    with pytest.raises(ValueError, match="base_temperature"):
        make_method("supcon", base_temperature=-1.0)
    with pytest.raises(ValueError, match="mining"):
        make_method("triplet", mining="hard")
    method = make_method("supcon")
    images, labels, g = _batch(8)
    with pytest.raises(ValueError, match="labels"):
        method(method.augment(images, g), labels=labels[:5])


def test_trainer_passes_labels(tmp_path):
    """fastcl.train gives a method with batch_extras = ("labels",) each batch's labels."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 255, (48, 1, 8, 8)).astype(np.uint8))
    y = torch.from_numpy(rng.integers(0, 3, 48).astype(np.int64))
    data = ImageData("tiny", x[:32], y[:32], x[32:], y[32:], ["a", "b", "c"])
    seen = []
    method_cls = get_method("triplet")
    original = method_cls.forward

    def spy(self, views, *, epoch=0, labels=None):
        seen.append(labels.clone())
        return original(self, views, epoch=epoch, labels=labels)

    method_cls.forward = spy
    try:
        train(TrainConfig(method="triplet", width=0.125, batch_size=16, epochs=1,
                          out=str(tmp_path), progress=False), data=data)
    finally:
        method_cls.forward = original
    assert len(seen) == 2
    torch.testing.assert_close(torch.sort(torch.cat(seen)).values, torch.sort(y[:32]).values)
