// CPU kernels of the Sinkhorn-Knopp op family (SwAV's code assignment): fastcl/ops/sinkhorn.py.
//
// For scores (B, K) (samples x prototypes), with a_bk = scores_bk - col_max_k (score units) and
// P_b = softmax over k of ((a_bk - max_k' a_bk') + potential_k) * inv_eps, so that every row of P
// sums to 1:
//
//   sinkhorn_init_fwd(scores, inv_eps)  -> (col_max (K,) = max_b scores_bk,
//                                           col_lse (K,) = log sum_b exp(a_bk * inv_eps))
//   sinkhorn_step_fwd(scores, inv_eps, col_max, potential)        -> col_sum (K,) = sum_b P_bk
//   sinkhorn_codes_fwd(scores, inv_eps, col_max, potential)       -> P (B, K) float32
//   sinkhorn_step_codes_fwd(scores, inv_eps, col_max, potential)  -> (col_sum, P): in one pass
//
// and, on a stored P (B, K) and column weights w (K,), with R_bk = P_bk w_k / sum_j P_bj w_j
// (the codes for log u + log w, without going back to the scores):
//
//   sinkhorn_rescaled_col_sum(P, w)                  -> col_sum (K,) = sum_b R_bk
//   sinkhorn_rescale_(P, w)                          -> P = R, in place
//
// The Python driver chains them into SwAV's algorithm (the derivation is in
// fastcl/ops/sinkhorn.py): one exact pass over the scores for the first column normalization,
// one that also stores P, then only multiply-adds over the stored P, whose rows are in [0, 1] and
// sum to 1, as long as the weights w stay within a range where that is exact to fp32.
//
// Each call reads its input exactly once. A row is processed whole in L1-resident buffers (a, its
// max, the logits, their max, exp, the row sum, then P). Every difference is taken in score units
// before the scaling by inv_eps, so nothing overflows for any magnitude or epsilon, a_bk is exact
// near each column's max, and entries whose differences tie exactly are split by the potential
// alone (as in exact arithmetic). init_fwd keeps a running column max per prototype, updated once
// per block of rows, so that each element costs one exp there too. Scores may be float32,
// bfloat16 or float16; 16-bit rows are converted to float32 one block at a time, never as a whole
// matrix. Fresh (B, K) outputs ask for huge pages (first-touch faults otherwise cost as much as
// the pass that writes them).
//
// Parallelism: rows are split into a fixed number of contiguous chunks, a few per thread, that
// the threads take one at a time (on a shared machine an idle core takes over the chunks of a
// busy one instead of waiting for it). Each chunk accumulates its own K-vector and the chunks are
// combined in a fixed order, so results do not depend on scheduling. Column sums are accumulated
// per block of kBlockRows rows and then added to the chunk total: fp32 rounding grows with the
// block and block counts, not with B.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

// The hot loops use at::vec (AVX2 + FMA, set up by cpu_kernels.h and checked at run time) and
// exp_u20, its polynomial exp (about twice as fast as Sleef's, a few 1e-7 relative error, 0
// below FLT_MIN where terms are negligible).
#include "checks.h"  // before cpu_kernels.h: baseline ISA
#include "kept_output.h"
#include "cpu_kernels.h"

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kLanes = Vec::size();
// Rows per block: the init pass reads a block twice (column max, then exp), the second time from
// L2 (32 rows x K = 3000 fp32 = 384 KiB), and pays one exp per prototype per block to rescale.
constexpr int64_t kBlockRows = 32;
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

/// Lanes [j, j + kLanes) of a row of k floats; lanes at or past k read as 0.
inline Vec load_lanes(const float* row, int64_t j, int64_t k) {
  return j + kLanes <= k ? Vec::loadu(row + j) : Vec::loadu(row + j, k - j);
}

/// Largest lane; NaN if any lane is NaN.
inline float lane_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
}

inline float lane_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

/// Rows [r0, r0 + rows) of scores (row stride `stride`, k columns) as float32 rows of stride
/// *out_stride: the scores themselves, or 16-bit rows converted into buf.
template <typename T>
const float* rows_as_float(const T* scores, int64_t stride, int64_t r0, int64_t rows, int64_t k,
                           std::vector<float>& buf, int64_t* out_stride) {
  if constexpr (std::is_same_v<T, float>) {
    *out_stride = stride;
    return scores + r0 * stride;
  } else {
    buf.resize(rows * k);
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = scores + (r0 + r) * stride;
      float* dst = buf.data() + r * k;
      for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<float>(src[j]);
    }
    *out_stride = k;
    return buf.data();
  }
}

/// e[0, kp) = exp((z - max z) * inv_eps) for z_j = (a_j - max a) + potential_j, a_j = row_j -
/// col_max_j, where kp = round_up(k, kLanes), col_max is padded with +inf and potential with -inf
/// up to kp (so e is 0 there). Returns 1 / sum_j e_j, so that e_j / sum is row P of the op, or NaN
/// when max a is not finite (a NaN or +-inf in the row or its column, or a row of -inf), where
/// SwAV's code gives NaN too.
float row_softmax_terms(const float* row, int64_t k, float inv_eps, const float* col_max,
                        const float* potential, float* e) {
  const int64_t kp = round_up(k, kLanes);
  Vec top(-kInf);
  for (int64_t j = 0; j < kp; j += kLanes) {
    const Vec a = load_lanes(row, j, k) - Vec::loadu(col_max + j);
    a.store(e + j);
    top = at::vec::maximum(top, a);
  }
  const float row_max = lane_max(top);
  if (!std::isfinite(row_max)) return std::numeric_limits<float>::quiet_NaN();
  const Vec a_max(row_max);
  top = Vec(-kInf);
  for (int64_t j = 0; j < kp; j += kLanes) {
    const Vec z = (Vec::loadu(e + j) - a_max) + Vec::loadu(potential + j);
    z.store(e + j);
    top = at::vec::maximum(top, z);
  }
  const Vec z_max(lane_max(top)), scale(inv_eps);
  Vec total(0.f);
  for (int64_t j = 0; j < kp; j += kLanes) {
    const Vec ej = ((Vec::loadu(e + j) - z_max) * scale).exp_u20();
    ej.store(e + j);
    total = total + ej;
  }
  return 1.f / lane_sum(total);
}

/// Column max of scores and sum of exp((scores - max) * inv_eps) over rows [b0, b1), accumulated
/// into col_max (init -inf) and col_sum (init 0), both padded to kp lanes (padding is ignored).
template <typename T>
void init_rows(const T* scores, int64_t stride, int64_t b0, int64_t b1, int64_t k, float inv_eps,
               float* col_max, float* col_sum) {
  const int64_t kp = round_up(k, kLanes);
  const Vec scale(inv_eps), zero(0.f), neg_inf(-kInf);
  std::vector<float> block_max(kp), shift(kp), converted;
  for (int64_t r0 = b0; r0 < b1; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, b1 - r0);
    int64_t ld;
    const float* x = rows_as_float(scores, stride, r0, rows, k, converted, &ld);
    std::fill(block_max.begin(), block_max.end(), -kInf);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < kp; j += kLanes) {
        const Vec v = load_lanes(x + r * ld, j, k);
        at::vec::maximum(Vec::loadu(block_max.data() + j), v).store(block_max.data() + j);
      }
    }
    // Move each column's running sum to the new max. A column still at -inf (all its scores so
    // far -inf) shifts by 0 instead, avoiding (-inf) - (-inf).
    for (int64_t j = 0; j < kp; j += kLanes) {
      const Vec old_max = Vec::loadu(col_max + j);
      const Vec new_max = at::vec::maximum(old_max, Vec::loadu(block_max.data() + j));
      const Vec s = Vec::blendv(new_max, zero, new_max == neg_inf);
      (Vec::loadu(col_sum + j) * ((old_max - s) * scale).exp_u20()).store(col_sum + j);
      new_max.store(col_max + j);
      s.store(shift.data() + j);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < kp; j += kLanes) {
        const Vec e = ((load_lanes(x + r * ld, j, k) - Vec::loadu(shift.data() + j)) * scale)
                          .exp_u20();
        (Vec::loadu(col_sum + j) + e).store(col_sum + j);
      }
    }
  }
}

/// For rows [b0, b1) of P: col_sum[0, kp) += their sum (when col_sum is given; padding lanes get
/// 0) and codes rows (row stride k) = P (when codes is given).
template <typename T>
void softmax_rows(const T* scores, int64_t stride, int64_t b0, int64_t b1, int64_t k,
                  float inv_eps, const float* col_max, const float* potential, float* col_sum,
                  float* codes) {
  const int64_t kp = round_up(k, kLanes);
  std::vector<float> e(kp), block_sum(kp), converted;
  for (int64_t r0 = b0; r0 < b1; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, b1 - r0);
    int64_t ld;
    const float* x = rows_as_float(scores, stride, r0, rows, k, converted, &ld);
    std::fill(block_sum.begin(), block_sum.end(), 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      const Vec inv_total(row_softmax_terms(x + r * ld, k, inv_eps, col_max, potential, e.data()));
      float* out = codes ? codes + (r0 + r) * k : nullptr;
      for (int64_t j = 0; j < kp; j += kLanes) {
        const Vec p = Vec::loadu(e.data() + j) * inv_total;
        if (col_sum) (p + Vec::loadu(block_sum.data() + j)).store(block_sum.data() + j);
        if (out) p.store(out + j, std::min(kLanes, k - j));
      }
    }
    if (!col_sum) continue;
    for (int64_t j = 0; j < kp; j += kLanes) {
      (Vec::loadu(col_sum + j) + Vec::loadu(block_sum.data() + j)).store(col_sum + j);
    }
  }
}

/// For rows [b0, b1) of p (B, k) and weights w (padded to kp lanes with 0), R_b = p_b * w / (p_b . w):
/// col_sum[0, kp) += sum_b R_b when col_sum is given, else p_b = R_b in place.
void rescale_rows(float* p, int64_t b0, int64_t b1, int64_t k, const float* w, float* col_sum) {
  const int64_t kp = round_up(k, kLanes);
  std::vector<float> block_sum(kp);
  for (int64_t r0 = b0; r0 < b1; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, b1 - r0);
    std::fill(block_sum.begin(), block_sum.end(), 0.f);
    for (int64_t r = r0; r < r0 + rows; ++r) {
      float* row = p + r * k;
      Vec dot(0.f);
      for (int64_t j = 0; j < kp; j += kLanes) {
        dot = at::vec::fmadd(load_lanes(row, j, k), Vec::loadu(w + j), dot);
      }
      const Vec inv_dot(1.f / lane_sum(dot));
      for (int64_t j = 0; j < kp; j += kLanes) {
        const Vec scaled = load_lanes(row, j, k) * Vec::loadu(w + j) * inv_dot;
        if (col_sum) {
          (scaled + Vec::loadu(block_sum.data() + j)).store(block_sum.data() + j);
        } else {
          scaled.store(row + j, std::min(kLanes, k - j));
        }
      }
    }
    if (!col_sum) continue;
    for (int64_t j = 0; j < kp; j += kLanes) {
      (Vec::loadu(col_sum + j) + Vec::loadu(block_sum.data() + j)).store(col_sum + j);
    }
  }
}

}  // namespace

FASTCL_END_AVX2_KERNELS

namespace {

// ---------------------------------------------------------------------------------------------
// Entry points (baseline ISA): checks, chunking, combination of the per-chunk results.
// ---------------------------------------------------------------------------------------------

/// scores: (B, K) CPU float32/bfloat16/float16 with unit column stride (copied only if not).
Tensor checked_scores(const Tensor& scores) {
  fastcl::require_avx2("Sinkhorn");
  fastcl::check_cpu(scores, "scores");
  TORCH_CHECK(scores.dim() == 2, "scores must be 2-D (B, K), got shape ", scores.sizes());
  const auto dtype = scores.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "scores must be float32, bfloat16 or float16, got ", dtype);
  return scores.stride(1) == 1 ? scores : scores.contiguous();
}

/// name: (K,) float32 -> a vector padded with `padding` to a whole number of lanes.
std::vector<float> padded(const char* name, const Tensor& v, int64_t k, float padding) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat, name,
              " must be a float32 CPU tensor, got ", v.scalar_type(), " on ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == k, name, " must have shape (", k, ",), got ",
              v.sizes());
  const Tensor src = v.contiguous();
  std::vector<float> out(round_up(k, kLanes), padding);
  std::copy(src.const_data_ptr<float>(), src.const_data_ptr<float>() + k, out.begin());
  return out;
}

/// Number of row chunks for b rows: a few per thread, each of at least one block of rows.
int64_t num_chunks(int64_t b) {
  constexpr int64_t kChunksPerThread = 4;
  const int64_t blocks = (b + kBlockRows - 1) / kBlockRows;
  return std::max<int64_t>(1, std::min(blocks, kChunksPerThread * at::get_num_threads()));
}

/// Calls fn(chunk, b0, b1) for the `chunks` contiguous row ranges of b rows, on every thread,
/// each taking the next chunk when it is done with one.
template <typename Fn>
void for_each_chunk(int64_t b, int64_t chunks, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) fn(c, b * c / chunks, b * (c + 1) / chunks);
  });
}

/// (col_max (K,) = max_b scores_bk, col_lse (K,) = log sum_b exp((scores_bk - col_max_k) *
/// inv_eps)), float32, for any magnitude.
std::tuple<Tensor, Tensor> sinkhorn_init_fwd(const Tensor& scores_in, double inv_eps) {
  const Tensor scores = checked_scores(scores_in);
  const int64_t b = scores.size(0), k = scores.size(1), kp = round_up(k, kLanes);
  const int64_t chunks = num_chunks(b);
  std::vector<float> chunk_max(chunks * kp, -kInf), chunk_sum(chunks * kp, 0.f);
  fastcl::with_float_data(scores, "scores", [&](auto* data) {
    for_each_chunk(b, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
      init_rows(data, scores.stride(0), b0, b1, k, static_cast<float>(inv_eps),
                chunk_max.data() + c * kp, chunk_sum.data() + c * kp);
    });
  });
  Tensor col_max = at::empty({k}, scores.options().dtype(at::kFloat));
  Tensor lse = at::empty({k}, scores.options().dtype(at::kFloat));
  float* out_max = col_max.mutable_data_ptr<float>();
  float* out = lse.mutable_data_ptr<float>();
  for (int64_t j = 0; j < k; ++j) {
    // A NaN or +inf score, or a column of -inf, makes SwAV's code NaN: so is the lse then.
    float top = -kInf;
    bool finite = true;
    for (int64_t c = 0; c < chunks; ++c) {
      const float m = chunk_max[c * kp + j];
      finite = finite && !std::isnan(m) && m != kInf;
      top = std::max(top, m);
    }
    out_max[j] = top;
    if (!finite || top == -kInf) {
      out[j] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      total += chunk_sum[c * kp + j] * std::exp((chunk_max[c * kp + j] - top) * inv_eps);
    }
    out[j] = std::log(total);
  }
  return {col_max, lse};
}

/// Adds up the per-chunk K-vectors (in chunk order, so results do not depend on scheduling).
Tensor combine_chunks(const std::vector<float>& chunk_sum, int64_t chunks, int64_t k,
                      const at::TensorOptions& options) {
  const int64_t kp = round_up(k, kLanes);
  Tensor col_sum = at::zeros({k}, options.dtype(at::kFloat));
  float* out = col_sum.mutable_data_ptr<float>();
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t j = 0; j < k; ++j) out[j] += chunk_sum[c * kp + j];
  }
  return col_sum;
}

/// A (B, K) float32 output. SwAV computes codes every step and drops them before the next, and
/// first-touch page faults on a fresh 49 MB buffer cost as much as the passes that fill it (and
/// vary several-fold between runs): the storage of the last codes is handed out again once nothing
/// else refers to it (fastcl::kept_or_new).
Tensor new_codes(const Tensor& scores) {
  return fastcl::kept_or_new<struct SinkhornCodes>(scores.sizes(),
                                                   scores.options().dtype(at::kFloat));
}

/// One pass of softmax_rows over scores: the column sums of P when with_col_sum, P when
/// with_codes (each (K,) / (B, K) float32, or an undefined tensor).
std::tuple<Tensor, Tensor> softmax_pass(const Tensor& scores_in, double inv_eps,
                                        const Tensor& col_max_in, const Tensor& potential_in,
                                        bool with_col_sum,
                                        bool with_codes) {
  const Tensor scores = checked_scores(scores_in);
  const int64_t b = scores.size(0), k = scores.size(1), kp = round_up(k, kLanes);
  const std::vector<float> col_max = padded("col_max", col_max_in, k, kInf);
  const std::vector<float> potential = padded("potential", potential_in, k, -kInf);
  const int64_t chunks = num_chunks(b);
  std::vector<float> chunk_sum(with_col_sum ? chunks * kp : 0, 0.f);
  Tensor codes = with_codes ? new_codes(scores) : Tensor();
  float* out = with_codes ? codes.mutable_data_ptr<float>() : nullptr;
  fastcl::with_float_data(scores, "scores", [&](auto* data) {
    for_each_chunk(b, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
      softmax_rows(data, scores.stride(0), b0, b1, k, static_cast<float>(inv_eps), col_max.data(),
                   potential.data(),
                   with_col_sum ? chunk_sum.data() + c * kp : nullptr, out);
    });
  });
  Tensor col_sum = with_col_sum ? combine_chunks(chunk_sum, chunks, k, scores.options()) : Tensor();
  return {col_sum, codes};
}

/// col_sum (K,) float32 = sum_b P_bk (P as in the header).
Tensor sinkhorn_step_fwd(const Tensor& scores, double inv_eps, const Tensor& col_max,
                         const Tensor& potential) {
  return std::get<0>(softmax_pass(scores, inv_eps, col_max, potential, true, false));
}

/// codes (B, K) float32 = P, each row summing to 1.
Tensor sinkhorn_codes_fwd(const Tensor& scores, double inv_eps, const Tensor& col_max,
                          const Tensor& potential) {
  return std::get<1>(softmax_pass(scores, inv_eps, col_max, potential, false, true));
}

/// (col_sum (K,), codes (B, K)) of the two above, in one pass over the scores.
std::tuple<Tensor, Tensor> sinkhorn_step_codes_fwd(const Tensor& scores, double inv_eps,
                                                   const Tensor& col_max,
                                                   const Tensor& potential) {
  return softmax_pass(scores, inv_eps, col_max, potential, true, true);
}

/// One pass of rescale_rows over codes (B, K) float32 with weights w (K,) float32: their column
/// sums (K,) when with_col_sum, else codes rescaled in place (and an undefined tensor returned).
Tensor rescale_pass(const Tensor& codes, const Tensor& w_in, bool with_col_sum) {
  fastcl::require_avx2("Sinkhorn");
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kFloat && codes.dim() == 2 &&
                  codes.is_contiguous(),
              "codes must be a contiguous 2-D float32 CPU tensor, got ", codes.scalar_type(),
              " of shape ", codes.sizes(), " on ", codes.device());
  const int64_t b = codes.size(0), k = codes.size(1), kp = round_up(k, kLanes);
  TORCH_CHECK(w_in.device().is_cpu() && w_in.scalar_type() == at::kFloat && w_in.dim() == 1 &&
                  w_in.size(0) == k,
              "w must be a float32 CPU tensor of shape (", k, ",), got ", w_in.scalar_type(),
              " of shape ", w_in.sizes());
  std::vector<float> w(kp, 0.f);
  const Tensor w_src = w_in.contiguous();
  std::copy(w_src.const_data_ptr<float>(), w_src.const_data_ptr<float>() + k, w.begin());
  const int64_t chunks = num_chunks(b);
  std::vector<float> chunk_sum(with_col_sum ? chunks * kp : 0, 0.f);
  float* p = codes.mutable_data_ptr<float>();
  for_each_chunk(b, chunks, [&](int64_t c, int64_t b0, int64_t b1) {
    rescale_rows(p, b0, b1, k, w.data(), with_col_sum ? chunk_sum.data() + c * kp : nullptr);
  });
  return with_col_sum ? combine_chunks(chunk_sum, chunks, k, codes.options()) : Tensor();
}

/// col_sum (K,) = sum_b R_bk with R_bk = codes_bk w_k / sum_j codes_bj w_j.
Tensor sinkhorn_rescaled_col_sum(const Tensor& codes, const Tensor& w) {
  return rescale_pass(codes, w, true);
}

/// codes = R in place.
void sinkhorn_rescale_(Tensor& codes, const Tensor& w) { rescale_pass(codes, w, false); }

}  // namespace

// Registered into fastcl._C by csrc/bindings.cpp.
void bind_sinkhorn(pybind11::module_& m) {
  // The kernels run on ATen threads only and never touch Python objects: release the GIL.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("sinkhorn_init_fwd", &sinkhorn_init_fwd,
        "scores (B, K), inv_eps -> (col_max (K,), col_lse (K,) = log sum_b exp((scores_bk - "
        "col_max_k) * inv_eps))",
        pybind11::arg("scores"), pybind11::arg("inv_eps"), nogil);
  m.def("sinkhorn_step_fwd", &sinkhorn_step_fwd,
        "scores (B, K), inv_eps, col_max (K,), potential (K,) -> col_sum (K,) = sum_b P_bk",
        pybind11::arg("scores"), pybind11::arg("inv_eps"), pybind11::arg("col_max"),
        pybind11::arg("potential"), nogil);
  m.def("sinkhorn_codes_fwd", &sinkhorn_codes_fwd,
        "scores (B, K), inv_eps, col_max (K,), potential (K,) -> codes P (B, K)",
        pybind11::arg("scores"), pybind11::arg("inv_eps"), pybind11::arg("col_max"),
        pybind11::arg("potential"), nogil);
  m.def("sinkhorn_step_codes_fwd", &sinkhorn_step_codes_fwd,
        "scores (B, K), inv_eps, col_max (K,), potential (K,) -> (col_sum (K,), codes (B, K)) "
        "in one pass",
        pybind11::arg("scores"), pybind11::arg("inv_eps"), pybind11::arg("col_max"),
        pybind11::arg("potential"), nogil);
  m.def("sinkhorn_rescaled_col_sum", &sinkhorn_rescaled_col_sum,
        "codes (B, K), w (K,) -> col_sum (K,) = sum_b codes_bk w_k / (codes_b . w)",
        pybind11::arg("codes"), pybind11::arg("w"), nogil);
  m.def("sinkhorn_rescale_", &sinkhorn_rescale_,
        "codes (B, K), w (K,): codes_bk <- codes_bk w_k / (codes_b . w), in place",
        pybind11::arg("codes"), pybind11::arg("w"), nogil);
}
