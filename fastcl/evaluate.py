"""Evaluation of a frozen encoder: weighted kNN (InstDisc's monitor) and a linear probe.

Both work on features extracted once from un-augmented, normalized images with the encoder in
eval mode (BatchNorm uses its running statistics).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl.augment import to_input
from fastcl.data import ImageFiles


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Tensor | ImageFiles, *,
                     mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                     batch_size: int = 512, device: torch.device | str = "cpu") -> Tensor:
    """images (N, C, H, W) uint8, or ImageFiles (decoded to their centred squares, batch by
    batch) -> features (N, F) in float32 on the CPU."""
    was_training = encoder.training
    encoder.eval()
    starts = range(0, len(images), batch_size)
    if isinstance(images, ImageFiles):
        batches = (x for x, _, _ in images.loader(
            [list(range(s, min(s + batch_size, len(images)))) for s in starts]))
    else:
        batches = (images[s:s + batch_size] for s in starts)
    out = []
    for batch in batches:
        out.append(encoder(to_input(batch.to(device), mean, std)).float().cpu())
    encoder.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                num_classes: int, k: int = 200, temperature: float = 0.07,
                chunk: int = 1024) -> Tensor:
    """Weighted kNN on cosine similarity, as InstDisc: each of the k nearest training samples votes
    for its class with weight exp(sim / temperature). (M, F) queries -> (M,) predicted labels."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"train_labels must have one label per train feature "
                         f"({train_features.shape[0]}), got {train_labels.shape[0]}")
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, test_features.shape[0], chunk):
        q = F.normalize(test_features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float32)
        votes.scatter_add_(1, train_labels[idx], torch.exp(sim / temperature))
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def capped_knn_k(k: int, train_labels: Tensor) -> int:
    """k, at most half the training images of the smallest class (and at least 1).

    With k above a class's size, even features that put every image of a class nearest each other
    make its queries' k neighbours mostly other classes: the vote then counts class sizes, not
    neighbourhoods (k = 200 on 125 images a class). At half, a query's k nearest can all share its
    class as long as half of that class is nearer to it than any other class's images."""
    counts = torch.bincount(train_labels)
    return max(1, min(k, int(counts[counts > 0].min()) // 2))


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, k: int = 200, temperature: float = 0.07) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``knn_predict``."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_features, train_labels, test_features, num_classes=num_classes,
                       k=k, temperature=temperature)
    return (pred == test_labels).float().mean().item()


def linear_probe_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                          test_labels: Tensor, *, epochs: int = 100, lr: float = 1e-2,
                          weight_decay: float = 1e-4, batch_size: int = 256,
                          seed: int = 0) -> float:
    """Top-1 accuracy of a linear classifier trained (AdamW, cosine lr, cross entropy) on the
    standardized frozen features; a fraction in [0, 1]."""
    mean, std = train_features.mean(0), train_features.std(0).clamp(min=1e-6)
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Linear(x_train.shape[1], num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-x_train.shape[0] // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x_train.shape[0], generator=g)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(clf(x_train[idx]), train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return (clf(x_test).argmax(1) == test_labels).float().mean().item()
