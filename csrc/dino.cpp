// CPU kernels of the DINO op family (contract in fastcl/ops/dino.py).
//
//   dino_cross_entropy_fwd(student, teacher, center, student_scale, teacher_scale)
//       -> (loss (), student_stats (2, S, B), teacher_stats (2, T, B))
//   dino_cross_entropy_bwd(student, teacher, center, student_scale, teacher_scale,
//                 student_stats, teacher_stats, grad) -> d student (S, B, K)
//
// Notation: student x (S, B, K), teacher (T, B, K), center c (K,), u = teacher - c,
// ss / ts = student / teacher scale. Per sample b:
//
// Forward, one pass over K: the (S + T) rows of a chunk of kChunk columns are brought into an L1/L2
// buffer, reduced to an online state on the chunk's own maxima, and merged into the running state:
//   m_s, l_s = sum exp((x_s - m_s) ss)    m_t, l_t = sum exp((u_t - m_t) ts)
//   A_ts = sum_k e_t,k d_s,k,  e_t,k = exp((u_t,k - m_t) ts),  d_s,k = (x_s,k - m_s) ss
// so that -sum_k p_t,k log q_s,k = log l_s - A_ts / l_t. Every exponent is a difference to a max
// taken in input units, so no cancellation between large logits.
// Backward: given the stats, every column is independent:
//   d x_s = coef (n_s q_s - sum_t p_t + [s < T] p_s),  coef = grad ss / (n_pairs B).
//
// Parallelism (at::parallel_for): the work items are (sample, range of K) pairs. A sample's S + T
// rows are processed together so that each teacher exponential serves all S student rows; K is
// split into ranges (merged afterwards in forward) only as far as needed to give every thread
// several items when B is small.
//
// Vectorization: at::vec with AVX2 + FMA, set up by cpu_kernels.h and checked at run time.
// Exponentials use
// exp_u20 (inline polynomial, ~1e-6 relative error): the kernels are exp-bound and Sleef's exp
// is an out-of-line call, about 1.5x slower here. exp_u20 maps NaN to a finite value, so
// non-finite inputs are tracked through the row maxima instead (a NaN or infinite max makes its
// row's sum NaN in forward and its sample's gradient NaN in backward, as in the reference).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "checks.h"  // before cpu_kernels.h: baseline ISA
#include "kept_output.h"
#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// Columns per chunk: (S + T) rows of 1024 fp32 (48 KiB at S + T = 12) stay in L1/L2 for the few
// sweeps a chunk needs, while the inputs stream from memory once.
constexpr int64_t kChunk = 1024;
// Work items per thread to aim for when splitting K (load balance on a shared machine).
constexpr int64_t kItemsPerThread = 4;
// Teacher rows whose dot products with a student row share one sweep (accumulators in registers):
// DINO has T = 2, iBOT / DINOv2 at most a few.
constexpr int64_t kTeacherGroup = 4;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Vector helpers: a main loop over full vectors and a scalar tail, for any length.
// ---------------------------------------------------------------------------------------------
/// max_k x_k, NaN if any x_k is NaN.
float max_of(const float* x, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
}

/// max(a, b), NaN if either is (std::max keeps or drops a NaN depending on the order).
float nan_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : std::max(a, b); }

/// out_k = exp((x_k - shift) * scale), returns sum_k out_k (in place when out == x); shift is the
/// row max, NaN when it is not finite. x - shift comes first: x and its max are nearby numbers,
/// their difference is exact.
float exp_shifted(const float* x, float* out, int64_t n, float shift, float scale) {
  if (!std::isfinite(shift)) return kNaN;
  const Vec vshift(shift), vscale(scale);
  Vec vsum(0.f);
  int64_t k = 0;
  for (; k + kVec <= n; k += kVec) {
    const Vec e = ((Vec::loadu(x + k) - vshift) * vscale).exp_u20();
    e.store(out + k);
    vsum = vsum + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; k < n; ++k) {
    out[k] = std::exp((x[k] - shift) * scale);
    sum += out[k];
  }
  return sum;
}

/// Rows of a (R, B, K) tensor, contiguous: row r of sample b starts at base + (r * B + b) * K.
template <typename scalar_t>
const scalar_t* row_ptr(const scalar_t* base, int64_t r, int64_t b, int64_t B, int64_t K) {
  return base + (r * B + b) * K;
}

/// n values from src as float into buf; for float inputs the source itself, no copy.
template <typename scalar_t>
const float* as_float(const scalar_t* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// ---------------------------------------------------------------------------------------------
// Online state of one sample over a range of K
// ---------------------------------------------------------------------------------------------
struct State {
  std::vector<float> m_s, m_t;   // (S,), (T,) maxima in input units
  std::vector<double> l_s, l_t;  // (S,), (T,) sums of exponentials on those maxima
  std::vector<double> a;         // (T * S,) pair sums, row-major over (t, s)
  bool empty = true;

  State(int64_t S, int64_t T) : m_s(S), m_t(T), l_s(S), l_t(T), a(T * S) {}

  /// Fold another state of the same sample (over a disjoint range of K) into this one.
  void merge(const State& o, float ss, float ts) {
    if (o.empty) return;
    if (empty) {
      *this = o;
      return;
    }
    const int64_t S = m_s.size(), T = m_t.size();
    std::vector<double> shift(S), shift_o(S);  // (m_s - new_s) * ss: moves every d_s
    for (int64_t s = 0; s < S; ++s) {
      const float new_s = nan_max(m_s[s], o.m_s[s]);
      shift[s] = (double(m_s[s]) - new_s) * ss;
      shift_o[s] = (double(o.m_s[s]) - new_s) * ss;
      l_s[s] = l_s[s] * std::exp(shift[s]) + o.l_s[s] * std::exp(shift_o[s]);
      m_s[s] = new_s;
    }
    for (int64_t t = 0; t < T; ++t) {
      const float new_t = nan_max(m_t[t], o.m_t[t]);
      const double r = std::exp((double(m_t[t]) - new_t) * ts);
      const double r_o = std::exp((double(o.m_t[t]) - new_t) * ts);
      for (int64_t s = 0; s < S; ++s) {
        a[t * S + s] = r * (a[t * S + s] + shift[s] * l_t[t]) +
                       r_o * (o.a[t * S + s] + shift_o[s] * o.l_t[t]);
      }
      l_t[t] = l_t[t] * r + o.l_t[t] * r_o;
      m_t[t] = new_t;
    }
  }
};

/// Per-thread chunk buffers: (T, kChunk) teacher exponentials and a converted student row.
struct Scratch {
  std::vector<float> e, x;
  explicit Scratch(int64_t T) : e(T * kChunk), x(kChunk) {}
};

/// The state of sample b over columns [k0, k0 + n), n <= kChunk, on the chunk's own maxima.
template <typename scalar_t>
void chunk_state(const scalar_t* student, const scalar_t* teacher, const float* center, int64_t S,
                 int64_t T, int64_t B, int64_t K, int64_t b, int64_t k0, int64_t n, float ss,
                 float ts, Scratch& buf, State& st) {
  for (int64_t t = 0; t < T; ++t) {
    float* e = buf.e.data() + t * kChunk;
    const float* x = as_float(row_ptr(teacher, t, b, B, K) + k0, e, n);
    at::vec::map2([](Vec v, Vec c) { return v - c; }, e, x, center + k0, n);
    st.m_t[t] = max_of(e, n);
    st.l_t[t] = exp_shifted(e, e, n, st.m_t[t], ts);
  }
  for (int64_t s = 0; s < S; ++s) {
    const float* x = as_float(row_ptr(student, s, b, B, K) + k0, buf.x.data(), n);
    const float m = max_of(x, n);
    st.m_s[s] = m;
    st.l_s[s] = 0.0;
    // Sweeps of d = (x - m) ss, each with up to kTeacherGroup teacher rows' dots with d in
    // registers (sum exp(d) on the first).
    for (int64_t t0 = 0; t0 < T; t0 += kTeacherGroup) {
      const int64_t group = std::min(kTeacherGroup, T - t0);
      const float* e = buf.e.data() + t0 * kChunk;
      const Vec vm(m), vss(ss);
      Vec vsum(0.f), acc[kTeacherGroup];
      for (auto& v : acc) v = Vec(0.f);
      int64_t k = 0;
      for (; k + kVec <= n; k += kVec) {
        const Vec d = (Vec::loadu(x + k) - vm) * vss;
        if (t0 == 0) vsum = vsum + d.exp_u20();
        for (int64_t g = 0; g < group; ++g) {
          acc[g] = at::vec::fmadd(Vec::loadu(e + g * kChunk + k), d, acc[g]);
        }
      }
      const auto add = [](Vec& p, Vec& q) { return p + q; };
      double l = at::vec::vec_reduce_all<float>(add, vsum);
      double a[kTeacherGroup];
      for (int64_t g = 0; g < group; ++g) a[g] = at::vec::vec_reduce_all<float>(add, acc[g]);
      for (; k < n; ++k) {
        const float d = (x[k] - m) * ss;
        if (t0 == 0) l += std::exp(d);
        for (int64_t g = 0; g < group; ++g) a[g] += double(e[g * kChunk + k]) * d;
      }
      if (t0 == 0) st.l_s[s] = std::isfinite(m) ? l : kNaN;
      for (int64_t g = 0; g < group; ++g) st.a[(t0 + g) * S + s] = a[g];
    }
  }
  st.empty = false;
}

// ---------------------------------------------------------------------------------------------
// Input handling
// ---------------------------------------------------------------------------------------------

struct Problem {
  Tensor student, teacher, center;  // contiguous; center float32 (K,)
  int64_t S, T, B, K;
  float ss, ts;
};

Problem make_problem(const Tensor& student, const Tensor& teacher, const Tensor& center,
                     const Tensor& student_scale, const Tensor& teacher_scale) {
  fastcl::require_avx2("DINO");
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && center.device().is_cpu(),
              "dino_loss: student, teacher and center must be CPU tensors");
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3,
              "dino_loss: student (S, B, K) and teacher (T, B, K) must be 3-D, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "dino_loss: student and teacher must share a dtype, got ", student.scalar_type(),
              " and ", teacher.scalar_type());
  const int64_t S = student.size(0), T = teacher.size(0), B = student.size(1),
                K = student.size(2);
  TORCH_CHECK(1 <= T && T <= S && S >= 2 && teacher.size(1) == B && teacher.size(2) == K && K >= 1,
              "dino_loss: expected student (S, B, K), teacher (T, B, K) with 1 <= T <= S, S >= 2, "
              "got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(center.numel() == K, "dino_loss: center must have K = ", K, " elements, got ",
              center.sizes());
  return {student.contiguous(), teacher.contiguous(),
          fastcl::contiguous_float(center.reshape({K}), "center"), S, T, B, K,
          fastcl::read_scale(student_scale, "student_scale"),
          fastcl::read_scale(teacher_scale, "teacher_scale")};
}

/// Ranges of K per sample: 1 when B alone gives every thread enough items.
int64_t k_splits(const Problem& p) {
  const int64_t chunks = (p.K + kChunk - 1) / kChunk;
  const int64_t wanted = (kItemsPerThread * at::get_num_threads() + p.B - 1) / p.B;
  return std::clamp<int64_t>(wanted, 1, chunks);
}

/// Columns [begin, end) of range r of n_ranges over K, aligned to whole chunks.
std::pair<int64_t, int64_t> k_range(const Problem& p, int64_t r, int64_t n_ranges) {
  const int64_t chunks = (p.K + kChunk - 1) / kChunk;
  const int64_t per = (chunks + n_ranges - 1) / n_ranges;
  return {std::min(p.K, r * per * kChunk), std::min(p.K, (r + 1) * per * kChunk)};
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_impl(const Problem& p, std::vector<State>& states, int64_t n_ranges) {
  const scalar_t* student = p.student.data_ptr<scalar_t>();
  const scalar_t* teacher = p.teacher.data_ptr<scalar_t>();
  const float* center = p.center.data_ptr<float>();
  at::parallel_for(0, p.B * n_ranges, 1, [&](int64_t begin, int64_t end) {
    Scratch buf(p.T);
    State chunk(p.S, p.T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_ranges;
      const auto [k_begin, k_end] = k_range(p, item % n_ranges, n_ranges);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kChunk) {
        const int64_t n = std::min(kChunk, k_end - k0);
        chunk_state(student, teacher, center, p.S, p.T, p.B, p.K, b, k0, n, p.ss, p.ts, buf,
                    chunk);
        states[item].merge(chunk, p.ss, p.ts);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> dino_cross_entropy_fwd(const Tensor& student, const Tensor& teacher,
                                                 const Tensor& center, const Tensor& student_scale,
                                                 const Tensor& teacher_scale) {
  const Problem p = make_problem(student, teacher, center, student_scale, teacher_scale);
  const int64_t n_ranges = k_splits(p);
  std::vector<State> states(p.B * n_ranges, State(p.S, p.T));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.student.scalar_type(),
                                  "dino_cross_entropy_fwd",
                                  [&] { forward_impl<scalar_t>(p, states, n_ranges); });

  const auto opts = p.student.options().dtype(at::kFloat);
  Tensor student_stats = at::empty({2, p.S, p.B}, opts);
  Tensor teacher_stats = at::empty({2, p.T, p.B}, opts);
  float* s_stats = student_stats.data_ptr<float>();
  float* t_stats = teacher_stats.data_ptr<float>();
  double total = 0.0;
  for (int64_t b = 0; b < p.B; ++b) {
    State& st = states[b * n_ranges];
    for (int64_t r = 1; r < n_ranges; ++r) st.merge(states[b * n_ranges + r], p.ss, p.ts);
    for (int64_t s = 0; s < p.S; ++s) {
      s_stats[s * p.B + b] = st.m_s[s];
      s_stats[(p.S + s) * p.B + b] = static_cast<float>(std::log(st.l_s[s]));
    }
    for (int64_t t = 0; t < p.T; ++t) {
      t_stats[t * p.B + b] = st.m_t[t];
      t_stats[(p.T + t) * p.B + b] = static_cast<float>(std::log(st.l_t[t]));
      for (int64_t s = 0; s < p.S; ++s) {
        if (s != t) total += std::log(st.l_s[s]) - st.a[t * p.S + s] / st.l_t[t];
      }
    }
  }
  const double n_pairs = double(p.T) * (p.S - 1);
  Tensor loss = at::full({}, total / (n_pairs * p.B), opts);
  return {loss, student_stats, teacher_stats};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

/// Whether the saved stats of sample b are all finite (else its gradient is NaN).
bool finite_stats(const float* stats, int64_t rows, int64_t B, int64_t b) {
  for (int64_t i = 0; i < 2 * rows; ++i) {
    if (!std::isfinite(stats[i * B + b])) return false;
  }
  return true;
}

/// Gradient of sample b's columns [k0, k0 + n) of the logits, n <= kChunk, into out (rows at
/// out + (s * B + b) * out_stride + k0; may be student itself for float): d x_s = coef (n_s q_s -
/// sum_{t paired with s} p_t), every t paired with s when diagonal, else every t != s.
/// buf: (T + 3) kChunk floats.
template <typename scalar_t>
void grad_chunk(const scalar_t* student, const scalar_t* teacher, const float* center, int64_t S,
                int64_t T, int64_t B, int64_t stride, int64_t b, int64_t k0, int64_t n, float ss,
                float ts, const float* s_stats, const float* t_stats, float coef, bool diagonal,
                scalar_t* out, int64_t out_stride, float* buf) {
  float* probs = buf;
  float* total = buf + T * kChunk;
  float* x = total + kChunk;
  float* g = x + kChunk;
  const auto dst = [&](int64_t s) { return out + (s * B + b) * out_stride + k0; };
  if (!finite_stats(s_stats, S, B, b) || !finite_stats(t_stats, T, B, b)) {
    for (int64_t s = 0; s < S; ++s) std::fill(dst(s), dst(s) + n, scalar_t(kNaN));
    return;
  }
  // p_t = exp((x_t - c - m_t) ts - log l_t) into probs, and total = sum_t p_t.
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = as_float(row_ptr(teacher, t, b, B, stride) + k0, x, n);
    const Vec vm(t_stats[t * B + b]), vlog(t_stats[(T + t) * B + b]), vts(ts);
    float* pt = probs + t * kChunk;
    at::vec::map2([=](Vec v, Vec c) { return at::vec::fmsub(v - c - vm, vts, vlog).exp_u20(); },
                  pt, xt, center + k0, n);
    if (t == 0) {
      std::copy(pt, pt + n, total);
    } else {
      at::vec::map2([](Vec a, Vec q) { return a + q; }, total, total, pt, n);
    }
  }
  // d x_s = coef (n_s q_s - (total - own)), q_s = exp((x_s - m_s) ss - log l_s),
  // own = p_s for s < T unless diagonal: one sweep per row, written straight to the output for
  // float.
  for (int64_t s = 0; s < S; ++s) {
    const bool excluded = !diagonal && s < T;
    const float* xs = as_float(row_ptr(student, s, b, B, stride) + k0, x, n);
    const Vec vm(s_stats[s * B + b]), vlog(s_stats[(S + s) * B + b]), vss(ss);
    const Vec vn(float(T - (excluded ? 1 : 0))), vcoef(coef);
    const auto grad = [=](Vec v, Vec rest) {
      return vcoef * at::vec::fmsub(vn, at::vec::fmsub(v - vm, vss, vlog).exp_u20(), rest);
    };
    float* gs = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      gs = dst(s);
    } else {
      gs = g;
    }
    if (excluded) {
      const float* own = probs + s * kChunk;
      at::vec::map3([=](Vec v, Vec tot, Vec mine) { return grad(v, tot - mine); }, gs, xs, total,
                    own, n);
    } else {
      at::vec::map2(grad, gs, xs, total, n);
    }
    if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(g, dst(s), n);
  }
}

template <typename scalar_t>
void backward_impl(const Problem& p, const float* s_stats, const float* t_stats, float coef,
                   scalar_t* out) {
  const scalar_t* student = p.student.data_ptr<scalar_t>();
  const scalar_t* teacher = p.teacher.data_ptr<scalar_t>();
  const float* center = p.center.data_ptr<float>();
  const int64_t chunks = (p.K + kChunk - 1) / kChunk;
  // Items are (sample, chunk): every column is independent once the stats are known.
  at::parallel_for(0, p.B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf((p.T + 3) * kChunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, k0 = (item % chunks) * kChunk;
      grad_chunk(student, teacher, center, p.S, p.T, p.B, p.K, b, k0,
                 std::min(kChunk, p.K - k0), p.ss, p.ts, s_stats, t_stats, coef, false, out, p.K,
                 buf.data());
    }
  });
}

Tensor dino_cross_entropy_bwd(const Tensor& student, const Tensor& teacher, const Tensor& center,
                     const Tensor& student_scale, const Tensor& teacher_scale,
                     const Tensor& student_stats, const Tensor& teacher_stats, const Tensor& grad) {
  const Problem p = make_problem(student, teacher, center, student_scale, teacher_scale);
  TORCH_CHECK(student_stats.sizes() == at::IntArrayRef({2, p.S, p.B}),
              "dino_cross_entropy_bwd: student_stats must have shape (2, S, B), got ",
              student_stats.sizes());
  TORCH_CHECK(teacher_stats.sizes() == at::IntArrayRef({2, p.T, p.B}),
              "dino_cross_entropy_bwd: teacher_stats must have shape (2, T, B), got ",
              teacher_stats.sizes());
  const Tensor s_stats = fastcl::contiguous_float(student_stats, "student_stats");
  const Tensor t_stats = fastcl::contiguous_float(teacher_stats, "teacher_stats");
  const float coef = static_cast<float>(fastcl::read_scale(grad, "grad") * double(p.ss) /
                                        (double(p.T) * (p.S - 1) * p.B));
  // A training loop drops the gradient (zero_grad) before the next backward: its storage is
  // handed out again then instead of page-faulting a fresh (S, B, K) block every step.
  Tensor dstudent = fastcl::kept_or_new<struct DinoGrad>({p.S, p.B, p.K}, p.student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.student.scalar_type(),
                                  "dino_cross_entropy_bwd", [&] {
    backward_impl<scalar_t>(p, s_stats.data_ptr<float>(), t_stats.data_ptr<float>(), coef,
                            dstudent.data_ptr<scalar_t>());
  });
  return dstudent;
}

// ---------------------------------------------------------------------------------------------
// The head fused with the loss: dino_head_fwd / dino_head_bwd (contract in
// fastcl/ops/dino_head.py)
// ---------------------------------------------------------------------------------------------
// Logits x = student W_s^T (S B, K) and u = teacher W_t^T - c (T B, K) are computed kTile columns
// at a time by at::mm (BLAS: the products are most of the work, (S + T) B H K multiply-adds per
// pass, and a BLAS GEMM runs them several times faster than a hand-written loop over H), and each
// tile is reduced by the kernels above at once, while it is in cache: forward merges the tile's
// per-sample online states; backward turns the tile into its logit gradient g in place and adds
// g W_s to d student and writes g^T student as the tile's rows of d W_s.

// Columns per tile: (S + T) B kTile fp32 logits (6 MiB at S + T = 12, B = 64), and enough columns
// per product for BLAS to run at full speed.
constexpr int64_t kTile = 2048;

struct HeadProblem {
  Tensor student, teacher;  // (S B, H), (T B, H) float32, contiguous
  Tensor student_weight, teacher_weight;  // (K, H), the inputs' dtype
  Tensor center, row_weight;  // (K,), (B,) float32
  int64_t S, T, B, H, K;
  float ss, ts;
  bool diagonal;

  /// Rows [k0, k0 + n) of a weight as float32.
  static Tensor rows(const Tensor& w, int64_t k0, int64_t n) {
    return w.narrow(0, k0, n).to(at::kFloat);
  }
};

HeadProblem make_head_problem(const Tensor& student, const Tensor& teacher,
                              const Tensor& student_weight, const Tensor& teacher_weight,
                              const Tensor& center, const Tensor& student_scale,
                              const Tensor& teacher_scale, const Tensor& row_weight,
                              bool diagonal) {
  fastcl::require_avx2("DINO head");
  using Named = std::pair<const Tensor*, const char*>;
  for (const auto& [x, name] : std::initializer_list<Named>{
           {&student, "student"}, {&teacher, "teacher"}, {&student_weight, "student_weight"},
           {&teacher_weight, "teacher_weight"}}) {
    fastcl::check_cpu_float(*x, name);
    TORCH_CHECK(x->scalar_type() == student.scalar_type(), "dino_head: ", name,
                " must have student's dtype ", student.scalar_type(), ", got ", x->scalar_type());
  }
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3 && student_weight.dim() == 2 &&
                  teacher_weight.dim() == 2,
              "dino_head: expected student (S, B, H), teacher (T, B, H), weights (K, H), got ",
              student.sizes(), ", ", teacher.sizes(), ", ", student_weight.sizes(), ", ",
              teacher_weight.sizes());
  const int64_t S = student.size(0), T = teacher.size(0), B = student.size(1),
                H = student.size(2), K = student_weight.size(0);
  TORCH_CHECK(1 <= T && T <= S && (diagonal || S >= 2) && teacher.size(1) == B &&
                  teacher.size(2) == H && student_weight.size(1) == H &&
                  teacher_weight.sizes() == student_weight.sizes() && B >= 1 && H >= 1 && K >= 1,
              "dino_head: expected student (S, B, H), teacher (T, B, H) with 1 <= T <= S (S >= 2 "
              "unless diagonal), weights (K, H), got ", student.sizes(), ", ", teacher.sizes(),
              ", ", student_weight.sizes(), ", ", teacher_weight.sizes());
  TORCH_CHECK(center.numel() == K, "dino_head: center must have K = ", K, " elements, got ",
              center.sizes());
  TORCH_CHECK(row_weight.numel() == B, "dino_head: row_weight must have B = ", B,
              " elements, got ", row_weight.sizes());
  return {fastcl::contiguous_float(student.reshape({S * B, H}), "student"),
          fastcl::contiguous_float(teacher.reshape({T * B, H}), "teacher"),
          student_weight.contiguous(),
          teacher_weight.contiguous(),
          fastcl::contiguous_float(center.reshape({K}), "center"),
          fastcl::contiguous_float(row_weight.reshape({B}), "row_weight"),
          S, T, B, H, K,
          fastcl::read_scale(student_scale, "student_scale"),
          fastcl::read_scale(teacher_scale, "teacher_scale"),
          diagonal};
}

/// The logits of columns [k0, k0 + n): (x (S B, n), u + c (T B, n)), float32 contiguous.
std::pair<Tensor, Tensor> tile_logits(const HeadProblem& p, int64_t k0, int64_t n) {
  return {at::mm(p.student, HeadProblem::rows(p.student_weight, k0, n).t()),
          at::mm(p.teacher, HeadProblem::rows(p.teacher_weight, k0, n).t())};
}

std::tuple<Tensor, Tensor, Tensor> dino_head_fwd(
    const Tensor& student, const Tensor& teacher, const Tensor& student_weight,
    const Tensor& teacher_weight, const Tensor& center, const Tensor& student_scale,
    const Tensor& teacher_scale, const Tensor& row_weight, bool diagonal) {
  const HeadProblem p = make_head_problem(student, teacher, student_weight, teacher_weight, center,
                                          student_scale, teacher_scale, row_weight, diagonal);
  std::vector<State> states(p.B, State(p.S, p.T));
  const float* c = p.center.data_ptr<float>();
  for (int64_t k0 = 0; k0 < p.K; k0 += kTile) {
    const int64_t n = std::min(kTile, p.K - k0);
    const auto [x, u] = tile_logits(p, k0, n);
    const float* xs = x.data_ptr<float>();
    const float* us = u.data_ptr<float>();
    at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
      Scratch buf(p.T);
      State chunk(p.S, p.T);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
          chunk_state(xs, us, c + k0, p.S, p.T, p.B, n, b, c0, std::min(kChunk, n - c0), p.ss,
                      p.ts, buf, chunk);
          states[b].merge(chunk, p.ss, p.ts);
        }
      }
    });
  }
  const auto opts = p.student.options();
  Tensor student_stats = at::empty({2, p.S, p.B}, opts);
  Tensor teacher_stats = at::empty({2, p.T, p.B}, opts);
  float* s_stats = student_stats.data_ptr<float>();
  float* t_stats = teacher_stats.data_ptr<float>();
  const float* w = p.row_weight.data_ptr<float>();
  double total = 0.0;
  for (int64_t b = 0; b < p.B; ++b) {
    const State& st = states[b];
    for (int64_t s = 0; s < p.S; ++s) {
      s_stats[s * p.B + b] = st.m_s[s];
      s_stats[(p.S + s) * p.B + b] = static_cast<float>(std::log(st.l_s[s]));
    }
    double sample = 0.0;
    for (int64_t t = 0; t < p.T; ++t) {
      t_stats[t * p.B + b] = st.m_t[t];
      t_stats[(p.T + t) * p.B + b] = static_cast<float>(std::log(st.l_t[t]));
      for (int64_t s = 0; s < p.S; ++s) {
        if (p.diagonal || s != t) sample += std::log(st.l_s[s]) - st.a[t * p.S + s] / st.l_t[t];
      }
    }
    total += double(w[b]) * sample;
  }
  return {at::full({}, total, opts), student_stats, teacher_stats};
}

std::tuple<Tensor, Tensor> dino_head_bwd(
    const Tensor& student, const Tensor& teacher, const Tensor& student_weight,
    const Tensor& teacher_weight, const Tensor& center, const Tensor& student_scale,
    const Tensor& teacher_scale, const Tensor& row_weight, bool diagonal,
    const Tensor& student_stats, const Tensor& teacher_stats, const Tensor& grad) {
  const HeadProblem p = make_head_problem(student, teacher, student_weight, teacher_weight, center,
                                          student_scale, teacher_scale, row_weight, diagonal);
  TORCH_CHECK(student_stats.sizes() == at::IntArrayRef({2, p.S, p.B}),
              "dino_head_bwd: student_stats must have shape (2, S, B), got ",
              student_stats.sizes());
  TORCH_CHECK(teacher_stats.sizes() == at::IntArrayRef({2, p.T, p.B}),
              "dino_head_bwd: teacher_stats must have shape (2, T, B), got ",
              teacher_stats.sizes());
  const Tensor s_stats = fastcl::contiguous_float(student_stats, "student_stats");
  const Tensor t_stats = fastcl::contiguous_float(teacher_stats, "teacher_stats");
  const double upstream = fastcl::read_scale(grad, "grad");
  std::vector<float> coef(p.B);
  for (int64_t b = 0; b < p.B; ++b) {
    coef[b] = static_cast<float>(upstream * p.ss * p.row_weight.data_ptr<float>()[b]);
  }
  Tensor dstudent = at::zeros({p.S * p.B, p.H}, p.student.options());
  // A training loop drops the weight's gradient (zero_grad) before the next backward: its
  // storage is handed out again then instead of page-faulting a fresh (K, H) block every step.
  Tensor dweight = fastcl::kept_or_new<struct DinoHeadWeightGrad>({p.K, p.H},
                                                                  p.student_weight.options());
  const bool float_weight = p.student_weight.scalar_type() == at::kFloat;
  const float* c = p.center.data_ptr<float>();
  for (int64_t k0 = 0; k0 < p.K; k0 += kTile) {
    const int64_t n = std::min(kTile, p.K - k0);
    const Tensor ws = HeadProblem::rows(p.student_weight, k0, n);
    Tensor x = at::mm(p.student, ws.t());
    const Tensor u = at::mm(p.teacher, HeadProblem::rows(p.teacher_weight, k0, n).t());
    float* xs = x.data_ptr<float>();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    at::parallel_for(0, p.B * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf((p.T + 3) * kChunk);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks, c0 = (item % chunks) * kChunk;
        grad_chunk<float>(xs, u.data_ptr<float>(), c + k0, p.S, p.T, p.B, n, b, c0,
                          std::min(kChunk, n - c0), p.ss, p.ts, s_stats.data_ptr<float>(),
                          t_stats.data_ptr<float>(), coef[b], p.diagonal, xs, n, buf.data());
      }
    });
    // x now holds the tile's logit gradient g (S B, n).
    dstudent.addmm_(x, ws);
    Tensor rows = dweight.narrow(0, k0, n);
    if (float_weight) {
      at::mm_out(rows, x.t(), p.student);
    } else {
      rows.copy_(at::mm(x.t(), p.student));
    }
  }
  return {dstudent.view({p.S, p.B, p.H}).to(student.scalar_type()), dweight};
}

}  // namespace

FASTCL_END_AVX2_KERNELS

void bind_dino(pybind11::module_& m) {
  m.def("dino_cross_entropy_fwd", &dino_cross_entropy_fwd,
        "student (S, B, K), teacher (T, B, K), center (K,), student_scale (), teacher_scale () -> "
        "(loss (), student_stats (2, S, B), teacher_stats (2, T, B))",
        pybind11::arg("student"), pybind11::arg("teacher"), pybind11::arg("center"),
        pybind11::arg("student_scale"), pybind11::arg("teacher_scale"));
  m.def("dino_cross_entropy_bwd", &dino_cross_entropy_bwd,
        "... student_stats (2, S, B), teacher_stats (2, T, B), grad () -> d student (S, B, K)",
        pybind11::arg("student"), pybind11::arg("teacher"), pybind11::arg("center"),
        pybind11::arg("student_scale"), pybind11::arg("teacher_scale"),
        pybind11::arg("student_stats"), pybind11::arg("teacher_stats"), pybind11::arg("grad"));
  m.def("dino_head_fwd", &dino_head_fwd,
        "student (S, B, H), teacher (T, B, H), student_weight (K, H), teacher_weight (K, H), "
        "center (K,), student_scale (), teacher_scale (), row_weight (B,), diagonal -> "
        "(loss (), student_stats (2, S, B), teacher_stats (2, T, B))",
        pybind11::arg("student"), pybind11::arg("teacher"), pybind11::arg("student_weight"),
        pybind11::arg("teacher_weight"), pybind11::arg("center"), pybind11::arg("student_scale"),
        pybind11::arg("teacher_scale"), pybind11::arg("row_weight"), pybind11::arg("diagonal"));
  m.def("dino_head_bwd", &dino_head_bwd,
        "... diagonal, student_stats (2, S, B), teacher_stats (2, T, B), grad () -> "
        "(d student (S, B, H), d student_weight (K, H))",
        pybind11::arg("student"), pybind11::arg("teacher"), pybind11::arg("student_weight"),
        pybind11::arg("teacher_weight"), pybind11::arg("center"), pybind11::arg("student_scale"),
        pybind11::arg("teacher_scale"), pybind11::arg("row_weight"), pybind11::arg("diagonal"),
        pybind11::arg("student_stats"), pybind11::arg("teacher_stats"), pybind11::arg("grad"));
}
