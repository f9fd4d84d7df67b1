"""DINO head op family: the last layer of DINO's projection head (the K prototypes) fused with the
DINO / iBOT cross-entropy, so that the (crops, B, K) logits exist neither in forward nor for
backward.

For student features (S, B, H), teacher features (T, B, H), prototype matrices W_s, W_t (K, H),
a center (K,), scales ss, ts (1 / temperatures) and per-sample weights w (B,):

    x_s = student_s W_s^T,  u_t = teacher_t W_t^T - center              (B, K) logits
    p_t = softmax(u_t ts),  q_s = softmax(x_s ss)
    loss = sum_b w_b sum_{(t, s) paired} -sum_k p_t,b,k log q_s,b,k

with every (t, s) paired, or (diagonal=False, DINO) every s != t. DINO is w = 1 / (T (S - 1) B),
diagonal=False; iBOT's masked patch tokens are S = T = 1, B = tokens, w = per-token weights,
diagonal=True.

* ``fastcl::head_cross_entropy(student, teacher, student_weight, teacher_weight, center,
  student_scale, teacher_scale, row_weight, diagonal)`` -> (loss (), student_stats (2, S, B),
  teacher_stats (2, T, B)): the stats of fastcl::dino_cross_entropy (fastcl/ops/dino.py), on the
  logits: [max_k x, log sum_k exp((x - max) ss)] and the same for u at ts.
* ``fastcl::head_cross_entropy_backward(..., student_stats, teacher_stats, grad)`` ->
  (d student (S, B, H), d student_weight (K, H)): with g_s = grad w_b ss (n_s q_s - sum_{t paired
  with s} p_t) (S, B, K), n_s the number of teacher crops paired with s,
  d student = g W_s and d W_s = g^T student (over all S B rows).
* ``fastcl::head_sinkhorn_center(teacher, teacher_weight, epsilon, iterations, gather)`` ->
  center (K,): DINOv2's Sinkhorn-Knopp teacher (fastcl/ops/sinkhorn.py's log-domain algorithm
  over the rows of teacher (R, H) W_t^T) as a center, i.e. softmax((teacher W_t^T - center) /
  epsilon) are the codes. Not differentiable.

Only the student and its prototypes get gradients (the teacher is an EMA, the center a running
mean or a Sinkhorn scaling). Inputs share a dtype: float32, bfloat16, float16 (logits, loss and
stats in fp32, gradients in the inputs' dtypes) or float64 (the reference).

Backends, by device through PyTorch's dispatcher (``register_backends``): the op bodies run the
references below (materialized logits; the truth in tests, and every device's float64), the CPU
kernels of csrc/dino.cpp (``dino_head_fwd`` / ``dino_head_bwd``: tiles of K whose logits come from
one at::mm each, reduced by the DINO family's online kernels), and on CUDA the Triton kernels of
kernels/dino_head.py (same launcher names: a stats pass per side, then a loss pass, and in
backward a row-stationary d student kernel and a prototype-stationary d W_s kernel, each tile of
logits recomputed from the features by tl.dot and never stored) for feature rows up to their
MAX_DIM = 512; wider rows run the tiles of K with cuBLAS products reduced by PyTorch ops
(``dino_head_tiled``). fastcl::head_sinkhorn_center runs its tiled PyTorch passes on every
device (cuBLAS products on CUDA; no Triton kernel).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl._backend import accumulation_dtype, register_backends
from fastcl.ops.dino import _row_stats, _softmax_from_stats, fake_outputs
from fastcl.ops.sinkhorn import _all_ranks_col_lse, _all_ranks_sum


def pair_mask(s: int, t: int, diagonal: bool, dtype: torch.dtype, device) -> Tensor:
    """(T, S) 1 where teacher crop t is paired with student crop s, else 0."""
    mask = torch.ones(t, s, dtype=dtype, device=device)
    if not diagonal:
        mask[:, :t].fill_diagonal_(0.0)
    return mask


# ----------------------------------------------------------------------------------------------
# References: plain PyTorch, materializing the logits. The truth in tests.
# ----------------------------------------------------------------------------------------------
def _logits(features: Tensor, weight: Tensor, acc: torch.dtype) -> Tensor:
    return features.to(acc) @ weight.to(acc).T


def dino_head_ref(
    student: Tensor, teacher: Tensor, student_weight: Tensor, teacher_weight: Tensor,
    center: Tensor, student_scale: Tensor, teacher_scale: Tensor, row_weight: Tensor,
    diagonal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """student (S, B, H), teacher (T, B, H), weights (K, H), center (K,), scales (), row_weight
    (B,) -> (loss (), student_stats (2, S, B), teacher_stats (2, T, B))."""
    acc = accumulation_dtype(student)
    x = _logits(student, student_weight, acc)
    u = _logits(teacher, teacher_weight, acc) - center.to(acc)
    ss, ts = student_scale.to(acc), teacher_scale.to(acc)
    student_stats, teacher_stats = _row_stats(x, ss), _row_stats(u, ts)
    p = _softmax_from_stats(u, ts, teacher_stats)
    log_q = (x - student_stats[0][..., None]) * ss - student_stats[1][..., None]
    ce = -torch.einsum("tbk,sbk->tsb", p, log_q)
    mask = pair_mask(x.shape[0], u.shape[0], diagonal, acc, x.device)
    loss = torch.einsum("tsb,ts,b->", ce, mask, row_weight.to(acc))
    return loss, student_stats, teacher_stats


def dino_head_backward_ref(
    student: Tensor, teacher: Tensor, student_weight: Tensor, teacher_weight: Tensor,
    center: Tensor, student_scale: Tensor, teacher_scale: Tensor, row_weight: Tensor,
    diagonal: bool, student_stats: Tensor, teacher_stats: Tensor, grad: Tensor,
) -> tuple[Tensor, Tensor]:
    """(d (grad * loss) / d student (S, B, H), / d student_weight (K, H)) in their dtypes."""
    acc = accumulation_dtype(student)
    x = _logits(student, student_weight, acc)
    u = _logits(teacher, teacher_weight, acc) - center.to(acc)
    ss = student_scale.to(acc)
    q = _softmax_from_stats(x, ss, student_stats.to(acc))
    p = _softmax_from_stats(u, teacher_scale.to(acc), teacher_stats.to(acc))
    mask = pair_mask(x.shape[0], u.shape[0], diagonal, acc, x.device)
    targets = torch.einsum("ts,tbk->sbk", mask, p)
    coef = grad.to(acc) * ss * row_weight.to(acc)[:, None]
    g = coef * (mask.sum(0)[:, None, None] * q - targets)  # (S, B, K)
    dstudent = g @ student_weight.to(acc)
    dweight = g.flatten(0, 1).T @ student.to(acc).flatten(0, 1)
    return dstudent.to(student.dtype), dweight.to(student_weight.dtype)


# ----------------------------------------------------------------------------------------------
# The CUDA path for rows wider than the Triton kernels take: tiles of K, each tile's logits from
# one product (cuBLAS), reduced by PyTorch ops while they are the only logits in memory.
# ----------------------------------------------------------------------------------------------
# Logits per tile (16 MiB of fp32): (S + T) B rows times a slice of K.
_TILE = 1 << 22


def _tiles(rows: int, k: int, elements: int):
    width = max(64, elements // max(rows, 1))
    return [(k0, min(k, k0 + width)) for k0 in range(0, k, width)]


def _tile_logits(student, teacher, student_weight, teacher_weight, center, k0, k1):
    """Columns [k0, k1) of the logits x (S, B, n) and u (T, B, n) of the features student and
    teacher (in the accumulation dtype)."""
    acc = student.dtype
    return (student @ student_weight[k0:k1].to(acc).T,
            teacher @ teacher_weight[k0:k1].to(acc).T - center[k0:k1].to(acc))


def dino_head_tiled(_kernels, student, teacher, student_weight, teacher_weight, center,
                    student_scale, teacher_scale, row_weight, diagonal):
    """The forward over tiles of K with the online state of the C++ kernels (csrc/dino.cpp): per
    (crop, sample) the maxima m, the sums l of exponentials on them and the pair sums a_ts =
    sum_k e_t,k d_s,k, e_t = exp((u_t - m_t) ts), d_s = (x_s - m_s) ss, so that the pair's
    cross-entropy is log l_s - a_ts / l_t."""
    acc = accumulation_dtype(student)
    features = student.to(acc), teacher.to(acc)
    ss, ts = student_scale.to(acc), teacher_scale.to(acc)
    s, b, _ = student.shape
    t = teacher.shape[0]
    state = None
    for k0, k1 in _tiles((s + t) * b, student_weight.shape[0], _TILE):
        x, u = _tile_logits(*features, student_weight, teacher_weight, center, k0, k1)
        m_s, m_t = x.amax(-1), u.amax(-1)
        if state is not None:  # the tile and the running state on common maxima
            m_s, m_t = torch.maximum(m_s, state[0]), torch.maximum(m_t, state[1])
        d = (x - m_s[..., None]) * ss
        e = torch.exp((u - m_t[..., None]) * ts)
        l_s, l_t, a = torch.exp(d).sum(-1), e.sum(-1), torch.einsum("tbn,sbn->tsb", e, d)
        if state is not None:
            old_m_s, old_m_t, old_l_s, old_l_t, old_a = state
            shift = (old_m_s - m_s) * ss  # moves every old d_s
            r = torch.exp((old_m_t - m_t) * ts)  # moves every old e_t
            l_s = l_s + old_l_s * torch.exp(shift)
            a = a + r[:, None] * (old_a + shift[None] * old_l_t[:, None])
            l_t = l_t + old_l_t * r
        state = m_s, m_t, l_s, l_t, a
    m_s, m_t, l_s, l_t, a = state
    ce = l_s.log()[None] - a / l_t[:, None]  # (T, S, B)
    loss = torch.einsum("tsb,ts,b->", ce, pair_mask(s, t, diagonal, acc, ce.device),
                        row_weight.to(acc))
    return loss, torch.stack([m_s, l_s.log()]), torch.stack([m_t, l_t.log()])


def dino_head_backward_tiled(_kernels, student, teacher, student_weight, teacher_weight, center,
                             student_scale, teacher_scale, row_weight, diagonal, student_stats,
                             teacher_stats, grad):
    """The backward over the same tiles: each tile's logit gradient g (S, B, n) adds g W_s to
    d student and is its tile's rows of d W_s = g^T student."""
    acc = accumulation_dtype(student)
    features = student.to(acc), teacher.to(acc)
    ss, ts = student_scale.to(acc), teacher_scale.to(acc)
    s, b, h = student.shape
    t, k = teacher.shape[0], student_weight.shape[0]
    mask = pair_mask(s, t, diagonal, acc, student.device)
    coef = grad.to(acc) * ss * row_weight.to(acc)[:, None]
    dstudent = torch.zeros(s * b, h, dtype=acc, device=student.device)
    dweight = torch.empty(k, h, dtype=student_weight.dtype, device=student.device)
    for k0, k1 in _tiles((s + t) * b, k, _TILE):
        x, u = _tile_logits(*features, student_weight, teacher_weight, center, k0, k1)
        q = _softmax_from_stats(x, ss, student_stats.to(acc))
        p = _softmax_from_stats(u, ts, teacher_stats.to(acc))
        g = (coef * (mask.sum(0)[:, None, None] * q - torch.einsum("ts,tbn->sbn", mask, p)))
        g = g.reshape(s * b, k1 - k0)
        dstudent.addmm_(g, student_weight[k0:k1].to(acc))
        dweight[k0:k1] = g.T @ features[0].reshape(s * b, h)
    return dstudent.view(s, b, h).to(student.dtype), dweight


# ----------------------------------------------------------------------------------------------
# fastcl::head_cross_entropy
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastcl::head_cross_entropy", mutates_args=())
def head_cross_entropy(
    student: Tensor, teacher: Tensor, student_weight: Tensor, teacher_weight: Tensor,
    center: Tensor, student_scale: Tensor, teacher_scale: Tensor, row_weight: Tensor,
    diagonal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """See the module docstring. Gradients flow to student and student_weight only."""
    return dino_head_ref(student, teacher, student_weight, teacher_weight, center, student_scale,
                         teacher_scale, row_weight, diagonal)


def _triton_or_tiled(launcher: str, tiled):
    """The Triton launcher `launcher` of kernels/dino_head.py where the kernels take the inputs
    (feature rows up to their MAX_DIM), else the tiled PyTorch path."""
    def launch(kernels, *args):
        if kernels.fits(*args):
            return getattr(kernels, launcher)(*args)
        return tiled(kernels, *args)
    return launch


register_backends(head_cross_entropy, "dino_head", dino_head_ref,
                  _triton_or_tiled("dino_head_fwd", dino_head_tiled), cpp_launch="dino_head_fwd")


@head_cross_entropy.register_fake
def _(student, teacher, student_weight, teacher_weight, center, student_scale, teacher_scale,
      row_weight, diagonal):
    return fake_outputs(student, teacher)


@torch.library.custom_op("fastcl::head_cross_entropy_backward", mutates_args=())
def head_cross_entropy_backward(
    student: Tensor, teacher: Tensor, student_weight: Tensor, teacher_weight: Tensor,
    center: Tensor, student_scale: Tensor, teacher_scale: Tensor, row_weight: Tensor,
    diagonal: bool, student_stats: Tensor, teacher_stats: Tensor, grad: Tensor,
) -> tuple[Tensor, Tensor]:
    """Gradients of grad * loss: (d student (S, B, H), d student_weight (K, H))."""
    return dino_head_backward_ref(student, teacher, student_weight, teacher_weight, center,
                                  student_scale, teacher_scale, row_weight, diagonal,
                                  student_stats, teacher_stats, grad)


register_backends(head_cross_entropy_backward, "dino_head", dino_head_backward_ref,
                  _triton_or_tiled("dino_head_bwd", dino_head_backward_tiled),
                  cpp_launch="dino_head_bwd")


@head_cross_entropy_backward.register_fake
def _(student, teacher, student_weight, teacher_weight, center, student_scale, teacher_scale,
      row_weight, diagonal, student_stats, teacher_stats, grad):
    return (torch.empty_like(student, memory_format=torch.contiguous_format),
            torch.empty_like(student_weight, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    _, student_stats, teacher_stats = output
    ctx.mark_non_differentiable(student_stats, teacher_stats)
    ctx.diagonal = inputs[-1]
    ctx.save_for_backward(*inputs[:-1], student_stats, teacher_stats)


def _grad(ctx, grad, _grad_student_stats, _grad_teacher_stats):
    nones = [None] * 9
    if grad is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return tuple(nones)
    saved = ctx.saved_tensors
    dstudent, dweight = head_cross_entropy_backward(*saved[:8], ctx.diagonal, *saved[8:], grad)
    nones[0] = dstudent if ctx.needs_input_grad[0] else None
    nones[2] = dweight if ctx.needs_input_grad[2] else None
    return tuple(nones)


head_cross_entropy.register_autograd(_grad, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# fastcl::head_sinkhorn_center
# ----------------------------------------------------------------------------------------------
# Logit elements per tile of the Sinkhorn passes (4 MiB of fp32): R rows times a slice of K.
_SINKHORN_TILE = 1 << 20


def sinkhorn_center_tiled(teacher: Tensor, teacher_weight: Tensor, epsilon: float,
                          iterations: int, gather: bool) -> Tensor:
    """teacher (R, H), teacher_weight (K, H) -> center (K,) in the accumulation dtype, with
    softmax((teacher W^T - center) / epsilon) the Sinkhorn codes of the logits teacher W^T.

    The algorithm of fastcl/ops/sinkhorn.py (SwAV's, in log domain): codes_rk = softmax_k((l_rk -
    colmax_k) / eps + log u_k), so center = colmax - eps (log u - max log u). Its passes recompute
    the logits tile by tile over K (one matmul of R x H x tile each) and keep only O(K + R) state:
    the first pass the column max and log-sum-exp; each further iteration a pass for the rows'
    online log-sum-exp (the softmax over K) and one for the column sums. Cost: 2 iterations - 1
    passes, each a (R, H) x (H, K) product, against one for the loss itself; the log u updates
    are in float64 like the sinkhorn op's.
    """
    acc = accumulation_dtype(teacher)
    y = teacher.to(acc)
    r, k = y.shape[0], teacher_weight.shape[0]
    tiles = _tiles(r, k, _SINKHORN_TILE)
    inv_eps = 1.0 / epsilon

    def tile(k0, k1):
        return y @ teacher_weight[k0:k1].to(acc).T

    col_max = torch.empty(k, dtype=acc, device=y.device)
    col_lse = torch.empty(k, dtype=acc, device=y.device)
    for k0, k1 in tiles:
        logits = tile(k0, k1)
        col_max[k0:k1] = logits.amax(0)
        col_lse[k0:k1] = torch.logsumexp((logits - col_max[k0:k1]) * inv_eps, dim=0)
    col_max, col_lse = _all_ranks_col_lse(col_max, col_lse, inv_eps, gather)
    log_u = -col_lse.double()

    def center_of(log_u: Tensor) -> Tensor:
        return col_max - ((log_u - log_u.max()) * epsilon).to(acc)

    for _ in range(iterations - 1):
        center = center_of(log_u)
        row_max = torch.full((r,), float("-inf"), dtype=acc, device=y.device)
        row_sum = torch.zeros(r, dtype=acc, device=y.device)
        for k0, k1 in tiles:  # online log-sum-exp of each row over K
            z = (tile(k0, k1) - center[k0:k1]) * inv_eps
            new_max = torch.maximum(row_max, z.amax(1))
            row_sum = (row_sum * torch.exp(row_max - new_max)
                       + torch.exp(z - new_max[:, None]).sum(1))
            row_max = new_max
        row_lse = row_max + row_sum.log()
        col_sum = torch.empty(k, dtype=acc, device=y.device)
        for k0, k1 in tiles:
            z = (tile(k0, k1) - center[k0:k1]) * inv_eps
            col_sum[k0:k1] = torch.exp(z - row_lse[:, None]).sum(0)
        log_u = log_u - _all_ranks_sum(col_sum, gather).double().log()
    return center_of(log_u)


@torch.library.custom_op("fastcl::head_sinkhorn_center", mutates_args=())
def head_sinkhorn_center(teacher: Tensor, teacher_weight: Tensor, epsilon: float, iterations: int,
                         gather: bool) -> Tensor:
    """teacher (R, H), teacher_weight (K, H) -> center (K,) (see sinkhorn_center_tiled). The
    tiles' products run on the tensors' device (BLAS, cuBLAS); no backend-specific kernel."""
    return sinkhorn_center_tiled(teacher, teacher_weight, epsilon, iterations, gather)


@head_sinkhorn_center.register_fake
def _(teacher, teacher_weight, epsilon, iterations, gather):
    return teacher.new_empty((teacher_weight.shape[0],), dtype=accumulation_dtype(teacher))
