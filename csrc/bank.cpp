// CPU kernels of the queue / memory-bank op family: fastcl/ops/bank.py (contracts there).
//
//   ring_enqueue(queue, pointer, count, keys)          queue rows (pointer + b) % S <- keys
//   bank_update(bank, indices, features, last, m)      bank rows <- n(m v + (1 - m) f)
//   sampled_lse_fwd(f, bank, indices, scale, shift)    -> (positive, lse, nce), each (B,)
//   sampled_lse_bwd(f, bank, indices, scale, shift, lse, grad_pos, grad_lse, grad_nce)
//                                                      -> df (B, D)
//
// The sampled ops read each anchor's K + 1 bank rows in place through their indices: the dot
// product is computed straight from the bank, nothing of size B x (K + 1) x D exists. Forward keeps
// the anchor's K + 1 logits in a per-thread buffer (O(K)), backward needs no buffer at all: with
// the forward's lse known, each row's weight w_bj follows from its logit, so the row is read once
// and accumulated into d f_b at once. Anchors are independent and processed in parallel, each by
// one thread in a fixed order: results do not depend on the number of threads. The next rows are
// prefetched, since the gather is a chain of random row reads.
//
// The loops are written as fixed-width lanes of independent accumulators so that the compiler
// vectorizes them for the baseline ISA without reassociating sums; the work is bound by memory.
// Bank rows and keys may be float32, bfloat16 or float16; arithmetic is fp32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using fastcl::check_cpu;

constexpr int kLanes = 16;
constexpr int64_t kPrefetchRows = 8;  // rows ahead of the one being read
constexpr int64_t kCacheLine = 64;
constexpr int64_t kUpdateGrain = 1 << 16;  // bank_update: elements per thread at least

template <typename T>
inline float dot_row(const float* f, const T* row, int64_t d) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += f[j + l] * static_cast<float>(row[j + l]);
  }
  for (; j < d; ++j) acc[j % kLanes] += f[j] * static_cast<float>(row[j]);
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(T)); off += kCacheLine) {
    __builtin_prefetch(p + off);
  }
}

/// log(1 + exp(x)) without overflow, accurate where exp(x) is tiny.
inline float softplus(float x) { return std::max(x, 0.f) + std::log1p(std::exp(-std::abs(x))); }

/// bank (N, D): a contiguous CPU float32/bfloat16/float16 tensor (rows are addressed by index).
void check_bank(const Tensor& bank, const char* name) {
  check_cpu(bank, name);
  TORCH_CHECK(bank.dim() == 2 && bank.is_contiguous(), name, " must be a contiguous (N, D) tensor",
              ", got shape ", bank.sizes(), " and strides ", bank.strides());
}

/// indices: int64 within [0, n), any shape -> contiguous. Out-of-range rows would be read out of
/// bounds: always checked (the Python layer names the argument first when it can).
Tensor checked_indices(const Tensor& indices, int64_t n) {
  check_cpu(indices, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ",
              indices.scalar_type());
  Tensor idx = indices.contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const bool in_range =
      std::all_of(p, p + idx.numel(), [n](int64_t i) { return i >= 0 && i < n; });
  TORCH_CHECK(in_range, "indices must lie in [0, ", n, ")");
  return idx;
}

/// f: (B, D) -> contiguous float32.
Tensor float_rows(const Tensor& f, int64_t d, const char* name) {
  Tensor x = fastcl::contiguous_float(f, name);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d, name, " must have shape (B, ", d, "), got ",
              x.sizes());
  return x;
}

Tensor float_vector(const Tensor& x, int64_t n, const char* name) {
  Tensor v = fastcl::contiguous_float(x, name);
  TORCH_CHECK(v.numel() == n, name, " must have ", n, " elements, got shape ", v.sizes());
  return v;
}

// ---------------------------------------------------------------------------------------------
// ring_enqueue
// ---------------------------------------------------------------------------------------------
void ring_enqueue(Tensor queue, Tensor pointer, Tensor count, const Tensor& keys) {
  check_bank(queue, "queue");
  check_cpu(keys, "keys");
  for (const Tensor* t : {&pointer, &count}) {
    check_cpu(*t, "pointer and count");
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kLong,
                "pointer and count must be int64 scalars, got ", t->scalar_type(), " of shape ",
                t->sizes());
  }
  const int64_t size = queue.size(0), batch = keys.size(0);
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == queue.size(1), "keys must have shape (B, ",
              queue.size(1), "), got ", keys.sizes());
  TORCH_CHECK(batch <= size, "keys must have at most ", size, " rows, got ", batch);
  int64_t* ptr = pointer.mutable_data_ptr<int64_t>();
  int64_t* filled = count.mutable_data_ptr<int64_t>();
  const int64_t start = *ptr;
  TORCH_CHECK(start >= 0 && start < size, "pointer must lie in [0, ", size, "), got ", start);
  // At most two contiguous runs of rows: up to the end of the ring, then from its start.
  const int64_t first = std::min(batch, size - start);
  queue.narrow(0, start, first).copy_(keys.narrow(0, 0, first));
  if (first < batch) queue.narrow(0, 0, batch - first).copy_(keys.narrow(0, first, batch - first));
  *ptr = (start + batch) % size;
  *filled = std::min(*filled + batch, size);
}

// ---------------------------------------------------------------------------------------------
// bank_update
// ---------------------------------------------------------------------------------------------
template <typename T>
void update_rows(T* bank, const int64_t* idx, const float* f, const bool* last, int64_t b,
                 int64_t d, float momentum) {
  // A batch of a few hundred rows is microseconds of work: run it on one thread (waking the
  // others costs more); parallel beyond about kUpdateGrain elements.
  const int64_t grain = std::max<int64_t>(1, kUpdateGrain / std::max<int64_t>(d, 1));
  at::parallel_for(0, b, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> mixed(d);
    for (int64_t i = b0; i < b1; ++i) {
      if (!last[i]) continue;  // a later position holds the same index and wins
      T* row = bank + idx[i] * d;
      const float* fi = f + i * d;
      float sq[kLanes] = {};
      for (int64_t j = 0; j < d; ++j) {
        mixed[j] = momentum * static_cast<float>(row[j]) + (1.f - momentum) * fi[j];
        sq[j % kLanes] += mixed[j] * mixed[j];
      }
      float norm_sq = 0.f;
      for (int l = 0; l < kLanes; ++l) norm_sq += sq[l];
      const float inv = 1.f / std::max(std::sqrt(norm_sq), 1e-12f);
      for (int64_t j = 0; j < d; ++j) row[j] = static_cast<T>(mixed[j] * inv);
    }
  });
}

void bank_update(Tensor bank, const Tensor& indices, const Tensor& features, const Tensor& last,
                 double momentum) {
  check_bank(bank, "bank");
  const int64_t n = bank.size(0), d = bank.size(1);
  const Tensor idx = checked_indices(indices, n);
  const Tensor f = float_rows(features, d, "features");
  const int64_t b = f.size(0);
  TORCH_CHECK(idx.numel() == b, "indices must have ", b, " elements, got ", idx.numel());
  check_cpu(last, "last");
  TORCH_CHECK(last.scalar_type() == at::kBool && last.numel() == b,
              "last must be a bool tensor of ", b, " elements");
  const Tensor keep = last.contiguous();
  const float m = static_cast<float>(momentum);
  switch (bank.scalar_type()) {
    case at::kFloat:
      return update_rows(bank.mutable_data_ptr<float>(), idx.const_data_ptr<int64_t>(),
                         f.const_data_ptr<float>(), keep.const_data_ptr<bool>(), b, d, m);
    case at::kBFloat16:
      return update_rows(bank.mutable_data_ptr<at::BFloat16>(), idx.const_data_ptr<int64_t>(),
                         f.const_data_ptr<float>(), keep.const_data_ptr<bool>(), b, d, m);
    case at::kHalf:
      return update_rows(bank.mutable_data_ptr<at::Half>(), idx.const_data_ptr<int64_t>(),
                         f.const_data_ptr<float>(), keep.const_data_ptr<bool>(), b, d, m);
    default:
      TORCH_CHECK(false, "bank must be float32, bfloat16 or float16, got ", bank.scalar_type());
  }
}

// ---------------------------------------------------------------------------------------------
// sampled_lse
// ---------------------------------------------------------------------------------------------
struct Sampled {
  Tensor f, idx;  // (B, D) float32, (B, K1) int64, both contiguous
  int64_t b, k1, d;
  float scale, shift;
};

Sampled sampled_inputs(const Tensor& f_in, const Tensor& bank, const Tensor& indices,
                       const Tensor& scale, const Tensor& nce_shift) {
  check_bank(bank, "bank");
  const int64_t d = bank.size(1);
  Tensor f = float_rows(f_in, d, "f");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == f.size(0) && indices.size(1) >= 1,
              "indices must have shape (", f.size(0), ", K + 1), got ", indices.sizes());
  Tensor idx = checked_indices(indices, bank.size(0));
  return {f, idx, f.size(0), idx.size(1), d, fastcl::read_scale(scale),
          fastcl::read_scale(nce_shift, "nce_shift")};
}

template <typename T>
void sampled_fwd_rows(const Sampled& in, const T* bank, float* positive, float* lse,
                      float* nce) {
  const float* f = in.f.const_data_ptr<float>();
  const int64_t* idx_all = in.idx.const_data_ptr<int64_t>();
  const int64_t k1 = in.k1, d = in.d;
  at::parallel_for(0, in.b, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(k1);
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t* idx = idx_all + i * k1;
      const float* fi = f + i * d;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < k1; ++j) {
        if (j + kPrefetchRows < k1) prefetch_row(bank + idx[j + kPrefetchRows] * d, d);
        s[j] = in.scale * dot_row(fi, bank + idx[j] * d, d);
        top = std::max(top, s[j]);
      }
      float total = 0.f, softplus_sum = 0.f;
      for (int64_t j = 0; j < k1; ++j) {
        total += std::exp(s[j] - top);
        softplus_sum += softplus(s[j] - in.shift);
      }
      positive[i] = s[0];
      lse[i] = top + std::log(total);
      nce[i] = softplus_sum;
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> sampled_lse_fwd(const Tensor& f, const Tensor& bank,
                                                   const Tensor& indices, const Tensor& scale,
                                                   const Tensor& nce_shift) {
  const Sampled in = sampled_inputs(f, bank, indices, scale, nce_shift);
  Tensor positive = at::empty({in.b}, in.f.options());
  Tensor lse = at::empty({in.b}, in.f.options());
  Tensor nce = at::empty({in.b}, in.f.options());
  fastcl::with_float_data(bank, "bank rows", [&](auto* rows) {
    sampled_fwd_rows(in, rows, positive.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                     nce.mutable_data_ptr<float>());
  });
  return {positive, lse, nce};
}

template <typename T>
void sampled_bwd_rows(const Sampled& in, const T* bank, const float* lse, const float* g_pos,
                      const float* g_lse, const float* g_nce, float* df) {
  const float* f = in.f.const_data_ptr<float>();
  const int64_t* idx_all = in.idx.const_data_ptr<int64_t>();
  const int64_t k1 = in.k1, d = in.d;
  at::parallel_for(0, in.b, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t* idx = idx_all + i * k1;
      const float* fi = f + i * d;
      float* out = df + i * d;
      std::fill(out, out + d, 0.f);
      for (int64_t j = 0; j < k1; ++j) {
        if (j + kPrefetchRows < k1) prefetch_row(bank + idx[j + kPrefetchRows] * d, d);
        const T* row = bank + idx[j] * d;
        const float s = in.scale * dot_row(fi, row, d);
        const float w = (j == 0 ? g_pos[i] : 0.f) + g_lse[i] * std::exp(s - lse[i]) +
                        g_nce[i] / (1.f + std::exp(in.shift - s));
        for (int64_t c = 0; c < d; ++c) out[c] += w * static_cast<float>(row[c]);
      }
      for (int64_t c = 0; c < d; ++c) out[c] *= in.scale;
    }
  });
}

Tensor sampled_lse_bwd(const Tensor& f, const Tensor& bank, const Tensor& indices,
                       const Tensor& scale, const Tensor& nce_shift, const Tensor& lse_in,
                       const Tensor& grad_pos_in, const Tensor& grad_lse_in,
                       const Tensor& grad_nce_in) {
  const Sampled in = sampled_inputs(f, bank, indices, scale, nce_shift);
  const Tensor lse = float_vector(lse_in, in.b, "lse");
  const Tensor grad_pos = float_vector(grad_pos_in, in.b, "grad_pos");
  const Tensor grad_lse = float_vector(grad_lse_in, in.b, "grad_lse");
  const Tensor grad_nce = float_vector(grad_nce_in, in.b, "grad_nce");
  Tensor df = at::empty({in.b, in.d}, in.f.options());
  fastcl::with_float_data(bank, "bank rows", [&](auto* rows) {
    sampled_bwd_rows(in, rows, lse.const_data_ptr<float>(), grad_pos.const_data_ptr<float>(),
                     grad_lse.const_data_ptr<float>(), grad_nce.const_data_ptr<float>(),
                     df.mutable_data_ptr<float>());
  });
  return df;
}

}  // namespace

// Registered into fastcl._C by csrc/bindings.cpp.
void bind_bank(pybind11::module_& m) {
  // The kernels run on ATen threads only and never touch Python objects: release the GIL.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  namespace py = pybind11;
  m.def("ring_enqueue", &ring_enqueue,
        "queue (S, D), pointer () int64, count () int64, keys (B, D): ring write in place",
        py::arg("queue"), py::arg("pointer"), py::arg("count"), py::arg("keys"), nogil);
  m.def("bank_update", &bank_update,
        "bank (N, D), indices (B,), features (B, D), last (B,) bool, momentum: in place",
        py::arg("bank"), py::arg("indices"), py::arg("features"), py::arg("last"),
        py::arg("momentum"), nogil);
  m.def("sampled_lse_fwd", &sampled_lse_fwd,
        "f (B, D), bank (N, D), indices (B, K + 1), scale (), nce_shift () -> (positive, lse, "
        "nce), each (B,)",
        py::arg("f"), py::arg("bank"), py::arg("indices"), py::arg("scale"),
        py::arg("nce_shift"), nogil);
  m.def("sampled_lse_bwd", &sampled_lse_bwd,
        "... lse (B,), grad_pos, grad_lse, grad_nce (B,) -> df (B, D) float32", py::arg("f"),
        py::arg("bank"), py::arg("indices"), py::arg("scale"), py::arg("nce_shift"),
        py::arg("lse"), py::arg("grad_pos"), py::arg("grad_lse"), py::arg("grad_nce"), nogil);
}
