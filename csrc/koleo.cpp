// CPU kernels of the KoLeo op family (contract in fastcl/ops/koleo.py).
//
//   koleo_fwd(x, eps) -> (loss (), neighbour (B,) int64)
//   koleo_bwd(x, neighbour, grad, eps) -> d x (B, D)
//
// Notation: x (B, D), n_i = x_i / max(||x_i||, eps), j = j(i) = argmax_{j != i} n_i . n_j (the
// lowest such j on a tie), r_i = n_i - n_j + eps (eps added to every component, as
// torch.nn.PairwiseDistance does), d_i = ||r_i||, loss = -1/B sum_i log(d_i + eps).
//
// Forward: the rows are normalized into a float32 (B, D) buffer; the nearest neighbours come from
// a tiled search (row blocks of kRowBlock rows against column blocks of kColBlock rows, so that a
// column block is read from cache by every row of the block), keeping only the running best per
// row: no (B, B) matrix. Row blocks are the parallel work items. The loss sums in double.
// Backward, from the saved neighbours, O(B D): with c_i = grad * dL/dd_i / d_i
// = -grad / (B d_i (d_i + eps)),
//   d n_i = c_i r_i - sum_{k : j(k) = i} c_k r_k
// (the rows that chose i as their neighbour, listed once in CSR form so that rows are independent
// work items without atomics), then through the normalization:
//   d x_i = (d n_i - n_i (n_i . d n_i)) / ||x_i||   where ||x_i|| >= eps,   d n_i / eps otherwise.
// A non-finite input makes the loss NaN (the search skips NaN scores; the reference propagates
// them).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "checks.h"  // before cpu_kernels.h: baseline ISA
#include "cpu_kernels.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// Rows searched together, and the column rows each of them scores per block: a (64, D) column
// block of fp32 stays in L1/L2 for the 16 rows (D up to ~512) while the rows sweep it.
constexpr int64_t kRowBlock = 16;
constexpr int64_t kColBlock = 64;

/// sum_k a_k b_k.
float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t k = 0;
  for (; k + kVec <= n; k += kVec) acc = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), acc);
  float out = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, acc);
  for (; k < n; ++k) out += a[k] * b[k];
  return out;
}

/// out = x (row of any float dtype) as float32; returns ||x||.
template <typename T>
float load_row(const T* x, float* out, int64_t n) {
  double sq = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<float>(x[k]);
    sq += static_cast<double>(out[k]) * out[k];
  }
  return static_cast<float>(std::sqrt(sq));
}

/// The normalized rows n (B, D) float32 and the norms ||x_i|| (B,), in parallel over rows.
void normalize_rows(const Tensor& x, float eps, std::vector<float>& n, std::vector<float>& norm) {
  const int64_t b = x.size(0), d = x.size(1);
  n.resize(b * d);
  norm.resize(b);
  fastcl::with_float_data(x, "x", [&](auto* data) {
    at::parallel_for(0, b, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        float* row = n.data() + i * d;
        norm[i] = load_row(data + i * d, row, d);
        const float inv = 1.f / std::max(norm[i], eps);
        for (int64_t k = 0; k < d; ++k) row[k] *= inv;
      }
    });
  });
}

/// Nearest neighbour of every row of n (B, D) by the largest inner product, self excluded, the
/// lowest index on a tie.
void nearest_neighbours(const float* n, int64_t b, int64_t d, int64_t* out) {
  at::parallel_for(0, (b + kRowBlock - 1) / kRowBlock, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t block = lo; block < hi; ++block) {
      const int64_t i0 = block * kRowBlock, i1 = std::min(b, i0 + kRowBlock);
      float best[kRowBlock];
      int64_t arg[kRowBlock];
      for (int64_t i = i0; i < i1; ++i) {
        best[i - i0] = -std::numeric_limits<float>::infinity();
        arg[i - i0] = i == 0 ? 1 : 0;  // any other row, kept only if every score is NaN
      }
      for (int64_t j0 = 0; j0 < b; j0 += kColBlock) {
        const int64_t j1 = std::min(b, j0 + kColBlock);
        for (int64_t i = i0; i < i1; ++i) {
          const float* row = n + i * d;
          for (int64_t j = j0; j < j1; ++j) {
            if (j == i) continue;
            const float s = dot(row, n + j * d, d);
            if (s > best[i - i0]) {  // strict: the lowest index keeps a tie
              best[i - i0] = s;
              arg[i - i0] = j;
            }
          }
        }
      }
      for (int64_t i = i0; i < i1; ++i) out[i] = arg[i - i0];
    }
  });
}

/// r = n_i - n_j + eps into out; returns ||r||.
float difference(const float* ni, const float* nj, float eps, float* out, int64_t d) {
  double sq = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    out[k] = ni[k] - nj[k] + eps;
    sq += static_cast<double>(out[k]) * out[k];
  }
  return static_cast<float>(std::sqrt(sq));
}

}  // namespace

FASTCL_END_AVX2_KERNELS

namespace {

void check_rows(const Tensor& x) {
  fastcl::check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 2, "x must have shape (B, D) with B >= 2, got ",
              x.sizes());
}

std::tuple<Tensor, Tensor> koleo_fwd(const Tensor& x_in, double eps_in) {
  check_rows(x_in);
  fastcl::require_avx2("KoLeo");
  const Tensor x = x_in.contiguous();
  const int64_t b = x.size(0), d = x.size(1);
  const float eps = static_cast<float>(eps_in);
  std::vector<float> n, norm;
  normalize_rows(x, eps, n, norm);
  Tensor neighbour = at::empty({b}, x.options().dtype(at::kLong));
  int64_t* nb = neighbour.data_ptr<int64_t>();
  nearest_neighbours(n.data(), b, d, nb);
  const double total = at::parallel_reduce(0, b, 64, 0.0, [&](int64_t lo, int64_t hi, double acc) {
    std::vector<float> r(d);
    for (int64_t i = lo; i < hi; ++i) {
      const float dist = difference(n.data() + i * d, n.data() + nb[i] * d, eps, r.data(), d);
      acc += std::log(static_cast<double>(dist) + eps);
    }
    return acc;
  }, std::plus<double>());
  const bool finite = at::isfinite(x).all().item<bool>();
  const float loss = finite ? static_cast<float>(-total / b) : std::numeric_limits<float>::quiet_NaN();
  return {at::scalar_tensor(loss, x.options().dtype(at::kFloat)), neighbour};
}

Tensor koleo_bwd(const Tensor& x_in, const Tensor& neighbour_in, const Tensor& grad, double eps_in) {
  check_rows(x_in);
  fastcl::check_cpu(neighbour_in, "neighbour");
  TORCH_CHECK(neighbour_in.scalar_type() == at::kLong && neighbour_in.dim() == 1 &&
                  neighbour_in.size(0) == x_in.size(0),
              "neighbour must be an int64 tensor of shape (", x_in.size(0), ",), got ",
              neighbour_in.scalar_type(), " ", neighbour_in.sizes());
  fastcl::require_avx2("KoLeo");
  const Tensor x = x_in.contiguous();
  const Tensor neighbour = neighbour_in.contiguous();
  const int64_t b = x.size(0), d = x.size(1);
  const float eps = static_cast<float>(eps_in);
  const float g = fastcl::read_scale(grad, "grad");
  const int64_t* nb = neighbour.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i)
    TORCH_CHECK(nb[i] >= 0 && nb[i] < b && nb[i] != i, "neighbour[", i, "] = ", nb[i],
                " is not another row of x");
  std::vector<float> n, norm;
  normalize_rows(x, eps, n, norm);
  // c_k = -grad / (B d_k (d_k + eps)), and the rows that chose each row (CSR, counting sort).
  std::vector<float> c(b);
  at::parallel_for(0, b, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> r(d);
    for (int64_t k = lo; k < hi; ++k) {
      const double dist = difference(n.data() + k * d, n.data() + nb[k] * d, eps, r.data(), d);
      c[k] = static_cast<float>(-g / (b * dist * (dist + eps)));
    }
  });
  std::vector<int64_t> start(b + 1, 0), chosen_by(b);
  for (int64_t k = 0; k < b; ++k) ++start[nb[k] + 1];
  for (int64_t i = 0; i < b; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t k = 0; k < b; ++k) chosen_by[fill[nb[k]]++] = k;

  Tensor out = at::empty({b, d}, x.options().dtype(at::kFloat));
  float* dx = out.data_ptr<float>();
  at::parallel_for(0, b, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> r(d);
    for (int64_t i = lo; i < hi; ++i) {
      const float* ni = n.data() + i * d;
      float* gi = dx + i * d;
      difference(ni, n.data() + nb[i] * d, eps, r.data(), d);
      for (int64_t t = 0; t < d; ++t) gi[t] = c[i] * r[t];
      for (int64_t e = start[i]; e < start[i + 1]; ++e) {
        const int64_t k = chosen_by[e];
        difference(n.data() + k * d, ni, eps, r.data(), d);
        for (int64_t t = 0; t < d; ++t) gi[t] -= c[k] * r[t];
      }
      if (norm[i] >= eps) {
        double proj = 0.0;
        for (int64_t t = 0; t < d; ++t) proj += static_cast<double>(ni[t]) * gi[t];
        const float p = static_cast<float>(proj), inv = 1.f / norm[i];
        for (int64_t t = 0; t < d; ++t) gi[t] = (gi[t] - ni[t] * p) * inv;
      } else {
        for (int64_t t = 0; t < d; ++t) gi[t] /= eps;
      }
    }
  });
  return out.to(x.scalar_type());
}

}  // namespace

void bind_koleo(pybind11::module_& m) {
  // The kernels run on ATen threads only and never touch Python objects: release the GIL.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("koleo_fwd", &koleo_fwd,
        "x (B, D), eps -> (loss (), neighbour (B,) int64): DINOv2's KoLeo with a tiled "
        "nearest-neighbour search",
        pybind11::arg("x"), pybind11::arg("eps"), nogil);
  m.def("koleo_bwd", &koleo_bwd,
        "x (B, D), neighbour (B,), grad (), eps -> d x (B, D) in x's dtype",
        pybind11::arg("x"), pybind11::arg("neighbour"), pybind11::arg("grad"), pybind11::arg("eps"),
        nogil);
}
