"""kNN (InstDisc weighting) and the linear probe on toy sets whose answers are known."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastcl import evaluate


def _blobs(n_per_class=40, classes=4, dim=16, spread=0.05, seed=0):
    """Separable set: one random direction per class plus small noise; (train, test) splits."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(classes, dim, generator=g), dim=1) * 3
    def draw(n):
        y = torch.arange(classes).repeat_interleave(n)
        return centers[y] + spread * torch.randn(len(y), dim, generator=g), y
    return (*draw(n_per_class), *draw(n_per_class // 2))


def test_knn_separable():
    x, y, xt, yt = _blobs()
    assert evaluate.knn_accuracy(x, y, xt, yt) == 1.0
    assert evaluate.knn_accuracy(x, y, xt, yt, k=1) == 1.0


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x, xt = torch.randn(30, 5, generator=g), torch.randn(7, 5, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    k, t = 6, 0.07
    pred = evaluate.knn_predict(x, y, xt, num_classes=3, k=k, temperature=t, chunk=3)
    for i in range(7):
        sims = [float(F.cosine_similarity(xt[i], x[j], dim=0)) for j in range(30)]
        top = sorted(range(30), key=lambda j: -sims[j])[:k]
        votes = [sum(math.exp(sims[j] / t) for j in top if y[j] == c) for c in range(3)]
        assert pred[i].item() == max(range(3), key=lambda c: votes[c])


def test_knn_k_larger_than_bank():
    x, y, xt, yt = _blobs(n_per_class=3)
    assert evaluate.knn_accuracy(x, y, xt, yt, k=200) == 1.0


def test_knn_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="train_labels"):
        evaluate.knn_predict(torch.randn(5, 2), torch.zeros(4, dtype=torch.long),
                             torch.randn(2, 2), num_classes=2)


def test_linear_probe_separable_and_random_labels():
    x, y, xt, yt = _blobs(spread=0.2)
    assert evaluate.linear_probe_accuracy(x, y, xt, yt, epochs=30) == 1.0
    # Labels unrelated to the features: the probe cannot beat chance by much on held-out data.
    g = torch.Generator().manual_seed(3)
    noise, noise_t = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    yr, yrt = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    assert evaluate.linear_probe_accuracy(noise, yr, noise_t, yrt, epochs=30) < 0.4


def test_linear_probe_is_deterministic():
    x, y, xt, yt = _blobs(spread=2.0)
    a = evaluate.linear_probe_accuracy(x, y, xt, yt, epochs=5)
    assert a == evaluate.linear_probe_accuracy(x, y, xt, yt, epochs=5)


def test_extract_features_eval_mode_and_batches():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.Flatten())
    net.train()
    images = (torch.rand(10, 1, 5, 5) * 255).to(torch.uint8)
    a = evaluate.extract_features(net, images, mean=[0.5], std=[0.5], batch_size=3)
    b = evaluate.extract_features(net, images, mean=[0.5], std=[0.5], batch_size=10)
    assert a.shape == (10, 36) and net.training  # restored to train mode
    torch.testing.assert_close(a, b)  # eval-mode BN: batches do not interact


def test_capped_knn_k():
    """k at most half the smallest class's training images, at least 1; classes without images
    (labels skipped) do not count."""
    labels = torch.tensor([0] * 125 + [1] * 300 + [3] * 90)
    assert evaluate.capped_knn_k(200, labels) == 45
    assert evaluate.capped_knn_k(20, labels) == 20
    assert evaluate.capped_knn_k(200, torch.tensor([0, 1, 1, 1])) == 1
