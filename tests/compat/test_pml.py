"""fastcl.compat.pml against pytorch-metric-learning 2.9's NTXentLoss and SupConLoss: the cases of
its tests/losses/test_ntxent_loss.py (github.com/KevinMusgrave/pytorch-metric-learning), then
values and gradients (learnable temperature included) against the real classes in fp32 / bf16 /
fp16, and the options the adapters refuse."""
import numpy as np
import pytest
import torch

from fastcl.compat.pml import NTXentLoss, SupConLoss, positive_pairs
from tests.compat.peers import DTYPES, compare
from tests.helpers import assert_close

pml = pytest.importorskip("pytorch_metric_learning.losses")
TEST_DTYPES = [torch.float16, torch.float32, torch.float64]


def _angles(angles, normalized=False, dtype=torch.float32):
    """The test utilities' angle_to_coord: 2-D embeddings at the given angles (degrees)."""
    r = np.radians(angles)
    x, y = np.cos(r), np.sin(r)
    if not normalized:
        x, y = 2 * x, 0.5 * y
    return torch.tensor(np.stack([x, y], axis=1), dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------------------------
# pytorch-metric-learning's tests/losses/test_ntxent_loss.py, run against the adapters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_ntxent_loss_cases(dtype):
    """test_ntxent_loss: its NTXentLoss case (A, a class of three: two positives per anchor) and
    its SupConLoss case (D) by the test's formula; the same embeddings as pairs of views (labels
    0, 0, 1, 1, 2, 3); its LpDistance (B, E) and PerAnchorReducer (C) cases raise."""
    temperature = 0.1
    embeddings = _angles([0, 10, 20, 50, 60, 80], normalized=True, dtype=dtype)
    rtol = 1e-2 if dtype == torch.float16 else 1e-5

    def pair_losses(labels):
        """Each positive pair's -log(exp(s_ap) / (exp(s_ap) + sum over negatives)) (NT-Xent) and
        -log(exp(s_ap) / sum over all others) (SupCon), by anchor, from the test's loops."""
        e = embeddings.detach().double()
        s = torch.exp(e @ e.T / temperature)
        nt, sc = {}, {}
        for a in range(len(labels)):
            others = [j for j in range(len(labels)) if j != a]
            negatives = sum(s[a, j] for j in others if labels[j] != labels[a])
            for p in [j for j in others if labels[j] == labels[a]]:
                nt.setdefault(a, []).append(-torch.log(s[a, p] / (s[a, p] + negatives)))
                sc.setdefault(a, []).append(-torch.log(s[a, p] / sum(s[a, j] for j in others)))
        return nt, sc

    labels = [0, 0, 0, 1, 1, 2]
    nt, sc = pair_losses(labels)
    expected = torch.stack([torch.stack(v).mean() for v in sc.values()]).mean()
    obtained = SupConLoss(temperature=temperature)(embeddings, torch.tensor(labels))
    assert torch.isclose(obtained.double(), expected, rtol=rtol)
    expected = torch.stack([x for v in nt.values() for x in v]).mean()
    obtained = NTXentLoss(temperature=temperature)(embeddings, torch.tensor(labels))
    assert torch.isclose(obtained.double(), expected, rtol=rtol)

    labels = [0, 0, 1, 1, 2, 3]
    nt, _ = pair_losses(labels)
    expected = torch.stack([x for v in nt.values() for x in v]).mean()
    obtained = NTXentLoss(temperature=temperature)(embeddings, torch.tensor(labels))
    assert torch.isclose(obtained.double(), expected, rtol=rtol)

    lp = pytest.importorskip("pytorch_metric_learning.distances").LpDistance()
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    for loss_class in [NTXentLoss, SupConLoss]:
        with pytest.raises(ValueError, match="distance"):
            loss_class(temperature=temperature, distance=lp)
        with pytest.raises(ValueError, match="reducer"):
            loss_class(temperature=temperature,
                       reducer=reducers.PerAnchorReducer(reducers.AvgNonZeroReducer()))


def test_ntxent_loss_with_ref_raises():
    embeddings, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    for loss_fn in [NTXentLoss(), SupConLoss()]:
        with pytest.raises(ValueError, match="ref_emb"):
            loss_fn(embeddings, labels, ref_emb=embeddings, ref_labels=labels)
        with pytest.raises(ValueError, match="indices_tuple"):
            loss_fn(embeddings, labels, indices_tuple=(labels, labels, labels, labels))


@pytest.mark.parametrize("loss_class", [NTXentLoss, SupConLoss])
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_with_no_valid_pairs(loss_class, dtype):
    """test_with_no_valid_pairs: one embedding, one class, no positive: loss 0, backward runs."""
    for angles, labels in [([0], [0]), ([0, 10, 20], [0, 0, 0]), ([0, 40, 60], [1, 2, 3])]:
        embeddings = _angles(angles, dtype=dtype)
        loss = loss_class(0.1)(embeddings, torch.tensor(labels))
        loss.backward()
        assert loss == 0
        assert not embeddings.grad.any()


@pytest.mark.parametrize("loss_class", [NTXentLoss, SupConLoss])
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_backward(loss_class, dtype):
    embeddings = _angles([0, 20, 40, 60, 80], dtype=dtype)
    loss_class(0.1)(embeddings, torch.tensor([0, 0, 1, 1, 2])).backward()
    assert torch.isfinite(embeddings.grad).all()


# ----------------------------------------------------------------------------------------------
# Against pytorch-metric-learning's classes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, temperature", [(6, 11, 0.07), (2, 3, 0.5), (31, 66, 0.2)])
def test_ntxent_equals_pml(dtype, n, d, temperature):
    # the two views of n samples, plus 3 embeddings without a positive
    labels = torch.cat([torch.arange(n).repeat(2), torch.arange(n, n + 3)])
    embeddings = torch.randn(len(labels), d)
    compare(lambda e: NTXentLoss(temperature)(e, labels),
            lambda e: pml.NTXentLoss(temperature)(e, labels), [embeddings], dtype,
            f"NTXentLoss {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, d, classes", [(13, 7, 3), (40, 33, 6), (7, 5, 2), (30, 9, 30)])
def test_ntxent_several_positives_equals_pml(dtype, m, d, classes):
    """Classes of any size (each positive pair its own term, the other positives in no
    denominator), with a learnable temperature."""
    labels = torch.randint(0, classes, (m,))
    embeddings = torch.randn(m, d)
    compare(lambda e, t: NTXentLoss(t)(e, labels), lambda e, t: pml.NTXentLoss(t)(e, labels),
            [embeddings, torch.tensor(0.15)], dtype, f"NTXentLoss {dtype}")


def test_ntxent_near_duplicate_positives():
    """Late training: each class's rows are near-duplicates orthogonal to the other classes, so
    each pair's loss is ~2e-8, below the fp32 resolution of the ratio pytorch-metric-learning
    rounds (its fp32 loss is then 0 or 1e-7); fastcl's fp32 loss and gradient equal
    pytorch-metric-learning's in float64 to a relative 1e-4."""
    centers = torch.linalg.qr(torch.randn(32, 5))[0].T * 4
    labels = torch.arange(5).repeat_interleave(3)
    embeddings = (centers[labels] + 1e-4 * torch.randn(15, 32)).requires_grad_()
    actual = NTXentLoss(0.05)(embeddings, labels)
    truth = embeddings.detach().double().requires_grad_()
    expected = pml.NTXentLoss(0.05)(truth, labels)
    value, value64 = actual.item(), expected.item()
    assert 0 < value64 < 1e-6
    assert abs(value - value64) <= 1e-4 * value64
    grad, = torch.autograd.grad(actual, embeddings)
    grad64, = torch.autograd.grad(expected, truth)
    assert float((grad.double() - grad64).abs().max()) <= 1e-4 * float(grad64.abs().max())


def test_positive_pairs():
    """Every ordered pair of distinct rows with equal labels, once, for shuffled labels."""
    labels = torch.randint(0, 6, (40,))
    anchors, partners = positive_pairs(labels)
    same = labels[:, None] == labels[None, :]
    expected = {(a, p) for a, p in same.fill_diagonal_(False).nonzero().tolist()}
    assert sorted(zip(anchors.tolist(), partners.tolist())) == sorted(expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, d, classes", [(13, 7, 4), (40, 33, 9), (5, 2, 5), (9, 4, 1)])
def test_supcon_equals_pml(dtype, m, d, classes):
    labels = torch.randint(0, classes, (m,))
    embeddings = torch.randn(m, d)
    # a learnable temperature: its gradient is compared too
    compare(lambda e, t: SupConLoss(t)(e, labels), lambda e, t: pml.SupConLoss(t)(e, labels),
            [embeddings, torch.tensor(0.15)], dtype, f"SupConLoss {dtype}")


def test_default_options_accepted():
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    embeddings, labels = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    for ours, theirs, reducer in [(NTXentLoss, pml.NTXentLoss, reducers.MeanReducer()),
                                  (SupConLoss, pml.SupConLoss, reducers.AvgNonZeroReducer())]:
        options = dict(distance=distances.CosineSimilarity(), reducer=reducer, collect_stats=True)
        assert_close(ours(0.2, **options)(embeddings, labels),
                     theirs(0.2, **options)(embeddings.double(), labels), 2e-6, ours.__name__)
    with pytest.raises(ValueError, match="embedding_regularizer"):
        SupConLoss(embedding_regularizer=pytest.importorskip(
            "pytorch_metric_learning.regularizers").LpRegularizer())
    with pytest.raises(ValueError, match="labels must be given"):
        SupConLoss()(embeddings)
