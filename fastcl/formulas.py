"""The papers' formulas, as their official code (or the common libraries) writes them: the textbook
expressions, materializing the full matrix of logits (or the gathered rows, or the per-pair
products), in any dtype, float64 included. They are the truth in the tests (run in float64) and
the naive baseline in the benchmarks; the losses in fastcl.losses compute the same values without
materializing anything.

One function per loss, named after it: ``formulas.nt_xent`` is the formula of ``fastcl.nt_xent``,
with the same arguments (less ``gather``). The ops' own references (``fastcl.ops.<family>.*_ref``)
are something else: the PyTorch backend of each op, on the op's inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl.distributed import world
from fastcl.losses.contrastive import Temperature, _reduce
from fastcl.losses.triplet import EPS


# ----------------------------------------------------------------------------------------------
# NT-Xent, InfoNCE, SupCon (fastcl.losses.contrastive)
# ----------------------------------------------------------------------------------------------
def nt_xent(z1: Tensor, z2: Tensor, temperature: Temperature = 0.5, *,
            normalize: bool = True, reduction: str = "mean") -> Tensor:
    """SimCLR's formula: (2N, 2N) logits, self-similarity masked, cross-entropy on the other view."""
    z = torch.cat([z1, z2])
    z = F.normalize(z, dim=1) if normalize else z
    n = z1.shape[0]
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def info_nce(query: Tensor, key: Tensor, negatives: Optional[Tensor] = None,
             temperature: Temperature = 0.07, *, symmetric: bool = False,
             normalize: bool = True, reduction: str = "mean") -> Tensor:
    """MoCo's formula with a queue (cat of the positive and queue logits, label 0); the CLIP /
    MoCo v3 formula (N x N logits, labels on the diagonal) without one."""
    q = F.normalize(query, dim=1) if normalize else query
    k = F.normalize(key, dim=1) if normalize else key
    if negatives is not None:
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.clone().detach().T], 1)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits / temperature, target, reduction=reduction)
    logits = q @ k.T / temperature
    target = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target, reduction="none"))
    return _reduce(loss, reduction)


def supcon(features: Tensor, labels: Tensor, temperature: Temperature = 0.1, *,
           normalize: bool = True, reduction: str = "mean") -> Tensor:
    """SupContrast's formula on features (M, D), labels (M,): dense (M, M) logits and masks."""
    z = F.normalize(features, dim=1) if normalize else features
    m = z.shape[0]
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    losses = -torch.where(positive, log_prob, 0.0).sum(1) / count.clamp(min=1)
    if reduction == "mean":
        return losses[count > 0].mean() if (count > 0).any() else losses.sum() * 0
    return _reduce(losses, reduction)


# ----------------------------------------------------------------------------------------------
# SigLIP (fastcl.losses.siglip): open_clip's SigLipLoss on one process
# ----------------------------------------------------------------------------------------------
def siglip(image: Tensor, text: Tensor, scale, bias, *, normalize: bool = True,
           reduction: str = "mean") -> Tensor:
    """SigLIP's formula as open_clip's SigLipLoss computes it: dense (N, N) logits
    scale x y^T + bias, a (N, N) matrix of labels 2 I - 1, -logsigmoid(labels * logits) summed
    per image (reduction "mean": the total over N)."""
    x = F.normalize(image, dim=1) if normalize else image
    y = F.normalize(text, dim=1) if normalize else text
    logits = scale * x @ y.T + bias
    n = x.shape[0]
    labels = 2 * torch.eye(n, device=x.device, dtype=x.dtype) - torch.ones(
        n, n, device=x.device, dtype=x.dtype)
    return _reduce(-F.logsigmoid(labels * logits).sum(1), reduction)


# ----------------------------------------------------------------------------------------------
# SimCLR v2's NT-Xent with a memory of negatives (fastcl.losses.simclrv2)
# ----------------------------------------------------------------------------------------------
def nt_xent_memory(z1: Tensor, z2: Tensor, memory: Tensor, temperature: float = 0.5, *,
                   normalize: bool = True, reduction: str = "mean") -> Tensor:
    """The (2N, 2N + K) logits in memory, self-similarity masked, cross-entropy on the other
    view."""
    z = torch.cat([z1, z2])
    z = F.normalize(z, dim=1) if normalize else z
    n = z1.shape[0]
    in_batch = (z @ z.T).fill_diagonal_(float("-inf"))
    logits = torch.cat([in_batch, z @ memory.detach().to(z.dtype).T], dim=1) / temperature
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target, reduction=reduction)


# ----------------------------------------------------------------------------------------------
# InvaSpread (fastcl.losses.invaspread)
# ----------------------------------------------------------------------------------------------
def invaspread(z1: Tensor, z2: Tensor, temperature: Temperature = 0.1, *,
               normalize: bool = True, reduction: str = "mean") -> Tensor:
    """InvaSpread's formula as its code computes it: exp of the dense logits against detached rows,
    self masked, P_a and the log(1 - s_ak / D_a) terms with the positive's removed. P_a is read
    from the same matrix (the official code recomputes it as a row dot product) so that the
    positive's term cancels exactly: in float64 this is exact while 1 - P_a >> 1e-16."""
    x = torch.cat([z1, z2])
    x = F.normalize(x, dim=1) if normalize else x
    m, n = x.shape[0], z1.shape[0]
    not_self = 1.0 - torch.eye(m, dtype=x.dtype, device=x.device)
    s = torch.exp(x @ x.detach().T / temperature) * not_self
    d = s.sum(1)
    rows = torch.arange(m, device=x.device)
    p = s[rows, (rows + n) % m] / d
    log_one_minus = torch.log(1 - s / d[:, None]).sum(1) - torch.log(1 - p)
    return _reduce(-(torch.log(p) + log_one_minus), reduction)


# ----------------------------------------------------------------------------------------------
# Losses over sampled bank rows, as InstDisc's code writes them (fastcl.losses.bank)
# ----------------------------------------------------------------------------------------------
def _sampled_logits_naive(features, bank, indices, temperature, normalize):
    f = F.normalize(features, dim=1) if normalize else features
    b, k1 = indices.shape
    rows = torch.index_select(bank, 0, indices.reshape(-1)).detach().reshape(b, k1, -1)
    return torch.bmm(rows.to(f.dtype), f[:, :, None]).squeeze(2) / temperature


def sampled_info_nce(features: Tensor, bank: Tensor, indices: Tensor,
                     temperature: float = 0.07, *, normalize: bool = True,
                     reduction: str = "mean") -> Tensor:
    """index_select of B (K + 1) rows -> bmm -> cross-entropy with label 0."""
    logits = _sampled_logits_naive(features, bank, indices, temperature, normalize)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def sampled_nce(features: Tensor, bank: Tensor, indices: Tensor, z,
                temperature: float = 0.07, *, normalize: bool = True,
                reduction: str = "mean") -> Tensor:
    """InstDisc's NCEAverage + NCECriterion: P = exp(logits) / Z, then the NCE log terms."""
    p = torch.exp(_sampled_logits_naive(features, bank, indices, temperature, normalize)) / z
    noise = (indices.shape[1] - 1) / bank.shape[0]  # K * Pn with Pn = 1 / n
    log_h_pos = torch.log(p[:, 0] / (p[:, 0] + noise))
    log_h_neg = torch.log(noise / (p[:, 1:] + noise)).sum(1)
    return _reduce(-(log_h_pos + log_h_neg), reduction)


# ----------------------------------------------------------------------------------------------
# DINO (fastcl.losses.dino): the official DINOLoss.forward, on the (S, B, K) / (T, B, K) layout
# ----------------------------------------------------------------------------------------------
def dino_loss(student: Tensor, teacher: Tensor, center: Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> Tensor:
    """The official DINO loss: student (S, B, K), teacher (T, B, K), center (1, K) or (K,)."""
    ncrops, n_teacher = student.shape[0], teacher.shape[0]
    student_out = student.flatten(0, 1) / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher.flatten(0, 1) - center) / teacher_temp, dim=-1)
    teacher_out = teacher_out.detach().chunk(n_teacher)

    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    return total_loss


def dino_loss_sinkhorn(student: Tensor, teacher: Tensor, student_temp: float = 0.1,
                       teacher_temp: float = 0.04, iterations: int = 3) -> Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` over all T * B teacher rows (the targets), then DINO's
    cross-entropy averaged over the (t, s != t) pairs: student (S, B, K), teacher (T, B, K).
    Computed in the inputs' dtype; overflows where DINOv2's exp(teacher / teacher_temp) does."""
    t, b, k = teacher.shape
    q = torch.exp(teacher.reshape(t * b, k) / teacher_temp).t()  # (K, T * B)
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / (t * b)
    codes = (q * t * b).t().reshape(t, b, k)
    log_q = torch.log_softmax(student / student_temp, dim=-1)
    pairs = [(i, j) for i in range(t) for j in range(student.shape[0]) if i != j]
    return sum(-(codes[i] * log_q[j]).sum(-1).mean() for i, j in pairs) / len(pairs)


def ibot_patch_loss(student: Tensor, teacher: Tensor, center: Optional[Tensor],
                    masks_weight: Tensor, n_images: int, student_temp: float = 0.1,
                    teacher_temp: float = 0.04, centering: str = "ema") -> Tensor:
    """DINOv2's iBOT loss on the masked patch tokens (iBOTPatchLoss.forward_masked): student and
    teacher logits (N, K) of the N masked tokens, masks_weight (N,) (1 / masked tokens of the
    token's image), divided by the number of images. The teacher's targets are its centered
    softmax (softmax_center_teacher) or, centering="sinkhorn", SwAV's / DINOv2's Sinkhorn-Knopp
    codes (sinkhorn_knopp_teacher)."""
    if centering == "sinkhorn":
        targets = sinkhorn(teacher, epsilon=teacher_temp)
    else:
        targets = F.softmax((teacher - center) / teacher_temp, dim=-1)
    loss = torch.sum(targets.detach() * F.log_softmax(student / student_temp, dim=-1), dim=-1)
    return -(loss * masks_weight).sum() / n_images


# ----------------------------------------------------------------------------------------------
# KoLeo (fastcl.koleo): DINOv2's KoLeoLoss
# ----------------------------------------------------------------------------------------------
def koleo(x: Tensor, eps: float = 1e-8) -> Tensor:
    """DINOv2's KoLeoLoss.forward on x (B, D): the (B, B) inner products of the normalized rows,
    the nearest other row by torch.max, nn.PairwiseDistance(2, eps) to it, -mean log(d + eps).
    Self is excluded with -inf on the diagonal where DINOv2 fills it with -1 (the same neighbours
    unless every other score is -1)."""
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.fill_diagonal_(float("-inf"))
    neighbour = torch.max(dots, dim=1).indices
    distances = nn.PairwiseDistance(2, eps=eps)(x, x[neighbour])
    return -torch.log(distances + eps).mean()


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (fastcl.sinkhorn): SwAV's distributed_sinkhorn
# ----------------------------------------------------------------------------------------------
def _all_ranks_sum(x: Tensor, gather: bool) -> Tensor:
    if gather:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
             gather: bool = False) -> Tensor:
    """SwAV's ``distributed_sinkhorn``, line for line, in the dtype of scores (B, K) -> (B, K).

    Overflows where SwAV's code does (exp(scores / epsilon) beyond the dtype's range gives
    inf/NaN): the baseline, and the truth in float64 where it stays finite.
    """
    gather = gather and world()[1] > 1
    Q = torch.exp(scores / epsilon).t()  # Q is K-by-B for consistency with notations from the paper
    B = Q.shape[1] * (world()[1] if gather else 1)  # number of samples to assign
    K = Q.shape[0]  # how many prototypes

    # make the matrix sum to 1
    sum_Q = _all_ranks_sum(torch.sum(Q), gather)
    Q /= sum_Q

    for _ in range(iterations):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = _all_ranks_sum(torch.sum(Q, dim=1, keepdim=True), gather)
        Q /= sum_of_rows
        Q /= K

        # normalize each column: total weight per sample must be 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B

    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.t()


# ----------------------------------------------------------------------------------------------
# SimSiam (fastcl.losses.simsiam)
# ----------------------------------------------------------------------------------------------
def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """The official formula: nn.CosineSimilarity on detached targets."""
    cos = nn.CosineSimilarity(dim=1)
    return -(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) * 0.5


# ----------------------------------------------------------------------------------------------
# Triplet margin (fastcl.losses.triplet)
# ----------------------------------------------------------------------------------------------
def triplet_margin(embeddings: Tensor, labels: Tensor, margin: float = 0.2, *,
                   mining: str = "semi_hard", distance: str = "squared",
                   normalize: bool = True) -> Tensor:
    """The definition, one anchor (and positive) at a time in Python loops."""
    x = F.normalize(embeddings, dim=1) if normalize else embeddings
    m = x.shape[0]

    def d(i: int, j: int) -> Tensor:
        sq = (x[i] - x[j]).square().sum()
        return sq if distance == "squared" else sq.clamp(min=EPS).sqrt()

    def value(t: Tensor) -> float:
        return float(t.detach())

    losses = []
    for a in range(m):
        positives = [p for p in range(m) if p != a and labels[p] == labels[a]]
        negatives = [n for n in range(m) if labels[n] != labels[a]]
        if not negatives:
            continue
        if mining == "batch_hard":
            if positives:
                d_ap = max((d(a, p) for p in positives), key=value)
                d_an = min((d(a, n) for n in negatives), key=value)
                losses.append(torch.relu(d_ap - d_an + margin))
            continue
        for p in positives:
            d_ap = d(a, p)
            farther = [d(a, n) for n in negatives if d(a, n) > d_ap]
            d_an = (min(farther, key=value) if farther
                    else max((d(a, n) for n in negatives), key=value))
            losses.append(torch.relu(d_ap - d_an + margin))
    return torch.stack(losses).mean() if losses else x.sum() * 0
