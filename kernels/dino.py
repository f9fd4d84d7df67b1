"""Triton kernels of the DINO op family (CUDA; tested on CPU under TRITON_INTERPRET=1).

Contract (see fastcl/ops/dino.py): student x (S, B, K), teacher (T, B, K), center c (K,),
ss = student scale, ts = teacher scale; u = teacher - c.

* ``_dino_fwd_kernel``, grid (B, SPLIT): a program owns sample b and one contiguous range of K,
  loads the S student and T teacher rows of each BLOCK_K block once, and keeps online statistics
  for every crop and pair: running max m and sum l = sum exp((. - m) * scale) per row, and per
  pair A_ts = sum_k e_t,k * d_s,k with e_t,k = exp((u_t,k - m_t) * ts), d_s,k = (x_s,k - m_s) * ss.
  Then -sum_k p_t,k log q_s,k = log l_s - A_ts / l_t. Each block is reduced to such a state on
  its own maxima and merged into the running one (``_merge``); a changed student max shifts A by
  (m_s - m_s') * ss * l_t, a changed teacher max rescales it like l_t.
* ``_dino_merge_kernel``, grid (B,): merges the SPLIT partial states of a sample and writes its
  stats and its loss sum_t sum_{s != t}. Splitting K keeps the GPU busy when B is small (DINO runs
  B = 64 per GPU); with SPLIT = 1 this kernel only finalizes.
* ``_dino_bwd_kernel``, grid (B, SPLIT): rebuilds q_s and p_t of each block from the stats and
  writes d x_s = coef * (n_s q_s - sum_t p_t + [s < T] p_s), coef = grad * ss / (n_pairs * B).

Crops live on the first axis of 2-D tiles (S_P2 or T_P2 rows, padded to the buckets of CONFIGS);
padded rows read 0 and are never stored. Offsets are 64-bit. Nothing here queries the GPU at
import time.

Work and floor (S student, T teacher crops of B samples over K prototypes): forward reads the
(S + T) B K logits once (coalesced BLOCK_K-wide rows) and takes (S + T) B K exps and T S B K
multiply-adds; backward reads them again and writes S B K gradients. At DINO's S = 12, T = 2,
B = 64, K = 65536 in bf16: 117 MB read forward, ~27 us at 4.3 TB/s (59 M exps: ~15 us at
~4 T exp/s); backward 218 MB, ~51 us. Splitting K over programs keeps 132 SMs busy at B = 64.
"""
import torch
import triton
import triton.language as tl

from fastcl.kernels.tiling import TARGET_PROGRAMS, whole_block_splits

# Elements of the (T_P2, S_P2, BLOCK_K) pair product per block: bounds the registers a program
# uses. At S = 10, T = 2 (BLOCK_K = 128, 8 warps) the forward compiles to 80 registers for sm_90,
# no spills; twice that would allow one program per SM. Not yet tuned on a GPU.
_PAIR_ELEMS = 4096
# What the launchers choose from, read by them and by fastcl.kernels.aot
# (tests/kernels/test_gpu_compile.py compiles every entry for sm_80 and sm_90): the logits' dtypes
# and the padded crop counts (S_P2, T_P2): S student crops are padded to the first S bucket >= S, T
# teacher crops likewise (T <= S; DINO, iBOT and DINOv2 use T = 2 and S = 2 + 6 to 2 + 10).
CONFIGS = dict(dtypes=(torch.float32, torch.bfloat16, torch.float16),
               student_crops=(4, 8, 16), teacher_crops=(2, 4))


@triton.jit
def _load_crops(ptr, crops, n_crops, b, ks, K, stride_c, stride_b, stride_k):
    """The (len(crops), len(ks)) tile of sample b of a (n_crops, B, K) tensor as float32: padded
    crops read 0, columns past K read -inf (they vanish from maxima and exponentials)."""
    offs = (crops[:, None].to(tl.int64) * stride_c + b.to(tl.int64) * stride_b
            + ks[None, :].to(tl.int64) * stride_k)
    x = tl.load(ptr + offs, mask=(crops[:, None] < n_crops) & (ks[None, :] < K), other=0.0)
    return tl.where(ks[None, :] < K, x.to(tl.float32), float("-inf"))


@triton.jit
def _block_state(student_ptr, teacher_ptr, center_ptr, ss, ts, b, start, S, K,
                 stride_ss, stride_sb, stride_sk, stride_ts, stride_tb, stride_tk,
                 T, S_P2: tl.constexpr, T_P2: tl.constexpr, BLOCK_K: tl.constexpr):
    """Online state of one block of K on the block's own maxima: (m_s, l_s, m_t, l_t, A)."""
    ks = start + tl.arange(0, BLOCK_K)
    x = _load_crops(student_ptr, tl.arange(0, S_P2), S, b, ks, K, stride_ss, stride_sb, stride_sk)
    u = _load_crops(teacher_ptr, tl.arange(0, T_P2), T, b, ks, K, stride_ts, stride_tb, stride_tk)
    u = u - tl.load(center_ptr + ks, mask=ks < K, other=0.0)[None, :]
    m_s = tl.max(x, 1)
    m_t = tl.max(u, 1)
    d = (x - m_s[:, None]) * ss  # -inf past K
    l_s = tl.sum(tl.exp(d), 1)
    e = tl.exp((u - m_t[:, None]) * ts)  # 0 past K
    d = tl.where(ks[None, :] < K, d, 0.0)  # so that e * d is 0 there, not 0 * -inf
    a = tl.sum(e[:, None, :] * d[None, :, :], 2)  # (T_P2, S_P2)
    return m_s, l_s, m_t, tl.sum(e, 1), a


@triton.jit
def _merge(m_s, l_s, m_t, l_t, a, m_s2, l_s2, m_t2, l_t2, a2, ss, ts):
    """Merge two online states of the same sample over disjoint ranges of K."""
    new_s = tl.maximum(m_s, m_s2)
    new_t = tl.maximum(m_t, m_t2)
    r_t, r_t2 = tl.exp((m_t - new_t) * ts), tl.exp((m_t2 - new_t) * ts)
    # A sums e_t d_s: d_s moves by (m_s - new_s) * ss with the student max, e_t scales like l_t.
    a = r_t[:, None] * (a + ((m_s - new_s) * ss)[None, :] * l_t[:, None])
    a2 = r_t2[:, None] * (a2 + ((m_s2 - new_s) * ss)[None, :] * l_t2[:, None])
    l_s = l_s * tl.exp((m_s - new_s) * ss) + l_s2 * tl.exp((m_s2 - new_s) * ss)
    return new_s, l_s, new_t, l_t * r_t + l_t2 * r_t2, a + a2


@triton.jit
def _dino_fwd_kernel(
    student_ptr,  # (S, B, K)
    teacher_ptr,  # (T, B, K), same dtype
    center_ptr,  # (K,) float32 contiguous
    sscale_ptr, tscale_ptr,  # () float32
    part_s_ptr,  # (SPLIT, 2, S_P2, B) float32 out: [m_s, l_s] per split
    part_t_ptr,  # (SPLIT, 2, T_P2, B) float32 out: [m_t, l_t] per split
    part_a_ptr,  # (SPLIT, T_P2, S_P2, B) float32 out: A per split
    S, B, K, k_per_split,
    stride_ss, stride_sb, stride_sk, stride_ts, stride_tb, stride_tk,
    T, S_P2: tl.constexpr, T_P2: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Online state of sample b over K range [split * k_per_split, + k_per_split)."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    ss = tl.load(sscale_ptr)
    ts = tl.load(tscale_ptr)
    first = split.to(tl.int64) * k_per_split
    end = tl.minimum(first + k_per_split, K)
    m_s, l_s, m_t, l_t, a = _block_state(
        student_ptr, teacher_ptr, center_ptr, ss, ts, b, first, S, K,
        stride_ss, stride_sb, stride_sk, stride_ts, stride_tb, stride_tk, T, S_P2, T_P2, BLOCK_K)
    for start in range(first + BLOCK_K, end, BLOCK_K):
        m_s2, l_s2, m_t2, l_t2, a2 = _block_state(
            student_ptr, teacher_ptr, center_ptr, ss, ts, b, start, S, K,
            stride_ss, stride_sb, stride_sk, stride_ts, stride_tb, stride_tk, T, S_P2, T_P2,
            BLOCK_K)
        m_s, l_s, m_t, l_t, a = _merge(m_s, l_s, m_t, l_t, a, m_s2, l_s2, m_t2, l_t2, a2, ss, ts)
    s_rows = tl.arange(0, S_P2)
    t_rows = tl.arange(0, T_P2)
    base = split * 2 * B  # the partial states are small: 32-bit offsets suffice
    tl.store(part_s_ptr + (base * S_P2 + s_rows * B + b), m_s)
    tl.store(part_s_ptr + ((base + B) * S_P2 + s_rows * B + b), l_s)
    tl.store(part_t_ptr + (base * T_P2 + t_rows * B + b), m_t)
    tl.store(part_t_ptr + ((base + B) * T_P2 + t_rows * B + b), l_t)
    a_offs = (split * T_P2 * S_P2 + t_rows[:, None] * S_P2 + s_rows[None, :]) * B + b
    tl.store(part_a_ptr + a_offs, a)


@triton.jit
def _load_state(part_s_ptr, part_t_ptr, part_a_ptr, split, b, B,
                S_P2: tl.constexpr, T_P2: tl.constexpr):
    """The partial state of one split of sample b."""
    s_rows = tl.arange(0, S_P2)
    t_rows = tl.arange(0, T_P2)
    base = split * 2 * B
    a_offs = (split * T_P2 * S_P2 + t_rows[:, None] * S_P2 + s_rows[None, :]) * B + b
    return (tl.load(part_s_ptr + (base * S_P2 + s_rows * B + b)),
            tl.load(part_s_ptr + ((base + B) * S_P2 + s_rows * B + b)),
            tl.load(part_t_ptr + (base * T_P2 + t_rows * B + b)),
            tl.load(part_t_ptr + ((base + B) * T_P2 + t_rows * B + b)),
            tl.load(part_a_ptr + a_offs))


@triton.jit
def _dino_merge_kernel(
    part_s_ptr, part_t_ptr, part_a_ptr,  # partial states, as written by _dino_fwd_kernel
    sscale_ptr, tscale_ptr,  # () float32
    student_stats_ptr,  # (2, S, B) float32 out
    teacher_stats_ptr,  # (2, T, B) float32 out
    row_loss_ptr,  # (B,) float32 out: sum_t sum_{s != t} cross-entropy of sample b
    S, B, n_split,
    T, S_P2: tl.constexpr, T_P2: tl.constexpr,
):
    """Merge the n_split partial states of sample b, then write its stats and loss."""
    b = tl.program_id(0)
    ss = tl.load(sscale_ptr)
    ts = tl.load(tscale_ptr)
    m_s, l_s, m_t, l_t, a = _load_state(part_s_ptr, part_t_ptr, part_a_ptr, 0, b, B, S_P2, T_P2)
    for split in range(1, n_split):
        m_s2, l_s2, m_t2, l_t2, a2 = _load_state(part_s_ptr, part_t_ptr, part_a_ptr, split, b, B,
                                                 S_P2, T_P2)
        m_s, l_s, m_t, l_t, a = _merge(m_s, l_s, m_t, l_t, a, m_s2, l_s2, m_t2, l_t2, a2, ss, ts)
    s_rows = tl.arange(0, S_P2)
    t_rows = tl.arange(0, T_P2)
    log_l_s = tl.log(l_s)
    # -sum_k p_t log q_s = sum_k p_t (log l_s - d_s) = log l_s - A_ts / l_t
    ce = log_l_s[None, :] - a / l_t[:, None]
    pair = (t_rows[:, None] < T) & (s_rows[None, :] < S) & (t_rows[:, None] != s_rows[None, :])
    tl.store(row_loss_ptr + b, tl.sum(tl.sum(tl.where(pair, ce, 0.0), 1), 0))
    s_ok = s_rows < S
    t_ok = t_rows < T
    tl.store(student_stats_ptr + s_rows * B + b, m_s, mask=s_ok)
    tl.store(student_stats_ptr + (S + s_rows) * B + b, log_l_s, mask=s_ok)
    tl.store(teacher_stats_ptr + t_rows * B + b, m_t, mask=t_ok)
    tl.store(teacher_stats_ptr + (T + t_rows) * B + b, tl.log(l_t), mask=t_ok)


@triton.jit
def _dino_bwd_kernel(
    student_ptr,  # (S, B, K)
    teacher_ptr,  # (T, B, K), same dtype
    center_ptr,  # (K,) float32 contiguous
    sscale_ptr, tscale_ptr, grad_ptr,  # () float32
    student_stats_ptr,  # (2, S, B) float32
    teacher_stats_ptr,  # (2, T, B) float32
    dstudent_ptr,  # (S, B, K) contiguous, student's dtype, out
    S, B, K, k_per_split, n_pairs,
    stride_ss, stride_sb, stride_sk, stride_ts, stride_tb, stride_tk,
    T, S_P2: tl.constexpr, T_P2: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d x for sample b over K range [split * k_per_split, + k_per_split)."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    ss = tl.load(sscale_ptr)
    ts = tl.load(tscale_ptr)
    coef = tl.load(grad_ptr) * ss / (n_pairs * B)
    s_rows = tl.arange(0, S_P2)
    t_rows = tl.arange(0, T_P2)
    s_ok = s_rows < S
    t_ok = t_rows < T
    m_s = tl.load(student_stats_ptr + s_rows * B + b, mask=s_ok, other=0.0)
    log_l_s = tl.load(student_stats_ptr + (S + s_rows) * B + b, mask=s_ok, other=0.0)
    m_t = tl.load(teacher_stats_ptr + t_rows * B + b, mask=t_ok, other=0.0)
    log_l_t = tl.load(teacher_stats_ptr + (T + t_rows) * B + b, mask=t_ok, other=0.0)
    # Pairs per student crop: every teacher crop but its own.
    n_s = T - (s_rows < T).to(tl.float32)
    first = split.to(tl.int64) * k_per_split
    end = tl.minimum(first + k_per_split, K)
    for start in range(first, end, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        x = _load_crops(student_ptr, s_rows, S, b, ks, K, stride_ss, stride_sb, stride_sk)
        u = _load_crops(teacher_ptr, t_rows, T, b, ks, K, stride_ts, stride_tb, stride_tk)
        u = u - tl.load(center_ptr + ks, mask=ks < K, other=0.0)[None, :]
        q = tl.exp((x - m_s[:, None]) * ss - log_l_s[:, None])
        p = tl.exp((u - m_t[:, None]) * ts - log_l_t[:, None])
        p = tl.where(t_ok[:, None], p, 0.0)  # padded teacher rows
        # own[s] = p[s] for s < T: a (S_P2, T_P2) selection, summed over the teacher axis.
        same = s_rows[:, None, None] == t_rows[None, :, None]
        own = tl.sum(tl.where(same, p[None, :, :], 0.0), 1)
        g = coef * (n_s[:, None] * q - (tl.sum(p, 0)[None, :] - own))
        offs = (s_rows[:, None].to(tl.int64) * B + b) * K + ks[None, :]
        tl.store(dstudent_ptr + offs, g.to(dstudent_ptr.dtype.element_ty),
                 mask=s_ok[:, None] & (ks[None, :] < K))


def fits(student_crops: int, teacher_crops: int) -> bool:
    """Whether the compiled crop buckets take S student and T teacher crops (else the op runs its
    reference)."""
    return (student_crops <= CONFIGS["student_crops"][-1]
            and teacher_crops <= CONFIGS["teacher_crops"][-1])


def _bucket(n: int, what: str) -> int:
    """The first of CONFIGS[what] >= n."""
    for size in CONFIGS[what]:
        if size >= n:
            return size
    raise ValueError(f"the GPU DINO kernels support at most {CONFIGS[what][-1]} "
                     f"{what.replace('_', ' ')}, got {n}")


def _config(s: int, t: int, b: int, k: int, block_k, split) -> dict:
    """Padded crop counts, the block width and how K is split among programs."""
    s_p2, t_p2 = _bucket(s, "student_crops"), _bucket(t, "teacher_crops")
    if block_k is None:
        block_k = max(16, min(1024, _PAIR_ELEMS // (s_p2 * t_p2)))
    if split is None:
        split = max(1, min(triton.cdiv(k, 4 * block_k), triton.cdiv(TARGET_PROGRAMS, b)))
    split, k_per_split = whole_block_splits(k, block_k, split)
    return dict(S_P2=s_p2, T_P2=t_p2, BLOCK_K=block_k, k_per_split=k_per_split, split=split)


def dino_cross_entropy_fwd(student, teacher, center, student_scale, teacher_scale, *, block_k=None,
                  split=None):
    """student (S, B, K), teacher (T, B, K), center (K,), scales () ->
    (loss () float32, student_stats (2, S, B) float32, teacher_stats (2, T, B) float32).
    block_k / split override the block width and the number of programs per sample (tests)."""
    s, b, k = student.shape
    t = teacher.shape[0]
    cfg = _config(s, t, b, k, block_k, split)
    s_p2, t_p2, n_split = cfg["S_P2"], cfg["T_P2"], cfg["split"]
    f32 = dict(dtype=torch.float32, device=student.device)
    center = center.to(torch.float32).contiguous()
    ss, ts = student_scale.float(), teacher_scale.float()
    part_s = torch.empty(n_split, 2, s_p2, b, **f32)
    part_t = torch.empty(n_split, 2, t_p2, b, **f32)
    part_a = torch.empty(n_split, t_p2, s_p2, b, **f32)
    _dino_fwd_kernel[(b, n_split)](
        student, teacher, center, ss, ts, part_s, part_t, part_a, s, b, k, cfg["k_per_split"],
        *student.stride(), *teacher.stride(), T=t, S_P2=s_p2, T_P2=t_p2, BLOCK_K=cfg["BLOCK_K"],
        num_warps=8,
    )
    student_stats, teacher_stats = torch.empty(2, s, b, **f32), torch.empty(2, t, b, **f32)
    row_loss = torch.empty(b, **f32)
    _dino_merge_kernel[(b,)](
        part_s, part_t, part_a, ss, ts, student_stats, teacher_stats, row_loss, s, b, n_split,
        T=t, S_P2=s_p2, T_P2=t_p2, num_warps=1,
    )
    loss = row_loss.sum() / (t * (s - 1) * b)
    return loss, student_stats, teacher_stats


def dino_cross_entropy_bwd(student, teacher, center, student_scale, teacher_scale, student_stats,
                  teacher_stats, grad, *, block_k=None, split=None):
    """-> d student (S, B, K), contiguous, in student's dtype (see the module docstring)."""
    s, b, k = student.shape
    t = teacher.shape[0]
    cfg = _config(s, t, b, k, block_k, split)
    dstudent = torch.empty((s, b, k), dtype=student.dtype, device=student.device)
    _dino_bwd_kernel[(b, cfg["split"])](
        student, teacher, center.to(torch.float32).contiguous(), student_scale.float(),
        teacher_scale.float(), grad.float(), student_stats.float().contiguous(),
        teacher_stats.float().contiguous(), dstudent, s, b, k, cfg["k_per_split"], t * (s - 1),
        *student.stride(), *teacher.stride(), T=t, S_P2=cfg["S_P2"], T_P2=cfg["T_P2"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=4,
    )
    return dstudent
