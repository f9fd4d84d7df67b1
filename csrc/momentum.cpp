// CPU kernel of the momentum (EMA) op family: fastcl/ops/momentum.py.
//
//   momentum_update_(target[], online[], momentum)
//       target_i <- momentum * target_i + (1 - momentum) * online_i      for every i, in place
//
// for one group of tensors: every target of one floating dtype, every online tensor of one
// floating dtype (float32, bfloat16 or float16 each, in any combination), all on the CPU, each
// pair with one shape and one dense memory layout (the Python side makes them so). The
// online tensors are read in their dtype, the update is computed in float32, the targets written
// in theirs: 12 bytes per parameter in float32, the minimum for an out-of-place EMA.
//
// Parallelism: every tensor is cut into chunks of at most kChunk elements, and one OpenMP loop
// runs over the flattened (tensor, chunk) list with dynamic scheduling, so both cores stay busy
// whatever the mix of tensor sizes (a model has a few large weights and many tiny BN vectors),
// and an idle core takes over from one that the machine slowed down. Each element is computed by
// exactly one chunk with the same arithmetic, so the result does not depend on scheduling. Inside
// a chunk the loop is vectorized at compile time (#pragma omp simd), with the 16-bit formats
// converted by branch-free integer arithmetic.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;

// 32768 elements: 128 KiB of float32 target (plus the online chunk) per work item, large enough
// that the loop overhead is nothing, small enough that a 2-core machine gets ~800 items for a
// ResNet-50 and the last items balance out.
constexpr int64_t kChunk = int64_t(1) << 15;

// ---------------------------------------------------------------------------------------------
// float32 <-> 16-bit conversions as plain integer arithmetic, which the compiler vectorizes (the
// c10 conversions branch on NaN or subnormals and keep the loop scalar).
// ---------------------------------------------------------------------------------------------
inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float load_float(float x) { return x; }

inline float load_float(at::BFloat16 x) { return bits_to_float(uint32_t(x.x) << 16); }

/// c ? a : b without a branch (the vectorizer turns the masks into blends).
inline uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

/// IEEE half -> float, exact for every input: the exponent is rebiased (15 -> 127) by integer
/// addition; subnormals are normalized by a float subtraction of normal numbers (so it holds
/// with denormals flushed too), inf/NaN get the all-ones exponent.
inline float load_float(at::Half x) {
  constexpr uint32_t kExponent = 0x7c00u << 13;  // the half exponent field, in float position
  const uint32_t h = x.x;
  const uint32_t shifted = (h & 0x7fffu) << 13;
  const uint32_t exponent = shifted & kExponent;
  const uint32_t rebiased = shifted + ((127u - 15u) << 23);
  const uint32_t special = rebiased + ((128u - 16u) << 23);
  const float subnormal = bits_to_float(rebiased + (1u << 23)) - bits_to_float(113u << 23);
  uint32_t magnitude = select(exponent == 0, float_to_bits(subnormal), rebiased);
  magnitude = select(exponent == kExponent, special, magnitude);
  return bits_to_float(((h & 0x8000u) << 16) | magnitude);
}

inline void store_float(float* dst, float v) { *dst = v; }

/// float -> bfloat16, rounding to nearest even; NaN stays a (quiet) NaN.
inline void store_float(at::BFloat16* dst, float v) {
  const uint32_t bits = float_to_bits(v);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  dst->x = static_cast<uint16_t>(select(nan, (bits >> 16) | 0x40u, rounded));
}

/// float -> IEEE half, rounding to nearest even, overflow to inf, subnormals exact, NaN kept.
inline void store_float(at::Half* dst, float v) {
  const uint32_t bits = float_to_bits(v);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs_bits = bits & 0x7fffffffu;
  // Normal range: drop 13 mantissa bits with round-to-nearest-even, rebias the exponent
  // (127 -> 15); the carry of the rounding may step into the next binade or to inf, as it should.
  const uint32_t normal =
      (abs_bits + 0x0fffu + ((abs_bits >> 13) & 1u) - ((127u - 15u) << 23)) >> 13;
  // Subnormal range (|v| < 2^-14): adding 0.5 aligns the value to the half subnormal grid (one
  // unit = 2^-24, the spacing of floats in [0.5, 1)) and the float adder rounds to nearest even.
  const uint32_t subnormal = float_to_bits(bits_to_float(abs_bits) + 0.5f) - float_to_bits(0.5f);
  uint32_t h = select(abs_bits < (113u << 23), subnormal, normal);
  h = select(abs_bits >= (143u << 23), 0x7c00u, h);  // |v| >= 65536, or inf: inf
  h = select(abs_bits > 0x7f800000u, 0x7e00u, h);    // NaN
  dst->x = static_cast<uint16_t>(sign | h);
}

/// target[0, n) = keep * target + take * online, computed in float32.
template <typename TargetT, typename OnlineT>
__attribute__((always_inline)) inline void update_chunk(TargetT* __restrict target,
                                                        const OnlineT* __restrict online,
                                                        int64_t n, float keep, float take) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    store_float(target + i, keep * load_float(target[i]) + take * load_float(online[i]));
  }
}

// Extensions are compiled for the baseline x86-64 ISA (SSE2: 4 lanes, and none of the widening
// loads, blends and packs that the 16-bit conversions need). The same loop is compiled a second
// time for AVX2 through a function attribute, and taken at run time on CPUs that have it: 2x
// faster with a 16-bit target or a float16 online tensor, the same results (no FMA contraction
// under -std=c++17).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__AVX2__)
#define FASTCL_MOMENTUM_AVX2_CLONE 1

template <typename TargetT, typename OnlineT>
__attribute__((target("avx2"))) void update_chunk_avx2(TargetT* target, const OnlineT* online,
                                                       int64_t n, float keep, float take) {
  update_chunk(target, online, n, keep, take);
}
#endif

template <typename TargetT, typename OnlineT>
void update_chunk_for_cpu(TargetT* target, const OnlineT* online, int64_t n, float keep,
                          float take) {
#if defined(FASTCL_MOMENTUM_AVX2_CLONE)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return update_chunk_avx2(target, online, n, keep, take);
#endif
  update_chunk(target, online, n, keep, take);
}

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename TargetT, typename OnlineT>
void update_group(const std::vector<Tensor>& targets, const std::vector<Tensor>& onlines,
                  float keep, float take) {
  std::vector<WorkItem> work;
  for (int64_t i = 0; i < static_cast<int64_t>(targets.size()); ++i) {
    const int64_t n = targets[i].numel();
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      work.push_back({i, begin, std::min(begin + kChunk, n)});
    }
  }
  std::vector<TargetT*> target_data(targets.size());
  std::vector<const OnlineT*> online_data(onlines.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    target_data[i] = targets[i].mutable_data_ptr<TargetT>();
    online_data[i] = onlines[i].const_data_ptr<OnlineT>();
  }
  const int64_t items = static_cast<int64_t>(work.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (items > 1)
  for (int64_t w = 0; w < items; ++w) {
    const WorkItem& item = work[w];
    update_chunk_for_cpu(target_data[item.tensor] + item.begin,
                         online_data[item.tensor] + item.begin, item.end - item.begin, keep, take);
  }
}

/// Calls fn(TargetT{}, OnlineT{}) with the C++ types of the two dtypes.
template <typename Fn>
void with_dtypes(at::ScalarType target, at::ScalarType online, Fn&& fn) {
  auto with_online = [&](auto target_tag) {
    switch (online) {
      case at::kFloat: return fn(target_tag, float{});
      case at::kBFloat16: return fn(target_tag, at::BFloat16{});
      case at::kHalf: return fn(target_tag, at::Half{});
      default: TORCH_CHECK(false, "online tensors must be float32, bfloat16 or float16, got ",
                           online);
    }
  };
  switch (target) {
    case at::kFloat: return with_online(float{});
    case at::kBFloat16: return with_online(at::BFloat16{});
    case at::kHalf: return with_online(at::Half{});
    default: TORCH_CHECK(false, "target tensors must be float32, bfloat16 or float16, got ",
                         target);
  }
}

void momentum_update_(const std::vector<Tensor>& targets, const std::vector<Tensor>& onlines,
                      const Tensor& momentum) {
  TORCH_CHECK(targets.size() == onlines.size(), "target and online must have as many tensors, got ",
              targets.size(), " and ", onlines.size());
  TORCH_CHECK(momentum.dim() == 0 && momentum.is_floating_point() && momentum.device().is_cpu(),
              "momentum must be a 0-dim floating CPU tensor, got ", momentum.scalar_type(),
              " of shape ", momentum.sizes(), " on ", momentum.device());
  if (targets.empty()) return;
  const auto target_dtype = targets[0].scalar_type();
  const auto online_dtype = onlines[0].scalar_type();
  for (size_t i = 0; i < targets.size(); ++i) {
    const Tensor& t = targets[i];
    const Tensor& o = onlines[i];
    TORCH_CHECK(t.device().is_cpu() && o.device().is_cpu(), "tensor pair ", i,
                " is not on the CPU");
    TORCH_CHECK(t.scalar_type() == target_dtype && o.scalar_type() == online_dtype,
                "tensor pair ", i, " has dtypes ", t.scalar_type(), ", ", o.scalar_type(),
                ", not the group's ", target_dtype, ", ", online_dtype);
    // Contiguous tensors may differ in the strides of size-1 dims, which order no element.
    const bool same_layout = (t.is_contiguous() && o.is_contiguous()) ||
                             (t.strides() == o.strides() && t.is_non_overlapping_and_dense());
    TORCH_CHECK(t.sizes() == o.sizes() && same_layout, "tensor pair ", i,
                " must have one shape and one dense layout, got shapes ", t.sizes(), ", ",
                o.sizes(), " and strides ", t.strides(), ", ", o.strides());
  }
  // The weights in double first, so that 1 - momentum is exact before rounding to float32
  // (1 - float(0.999) would be off by 1.3e-5 relative).
  const double m = momentum.item<double>();
  const float keep = static_cast<float>(m), take = static_cast<float>(1.0 - m);
  with_dtypes(target_dtype, online_dtype, [&](auto target_tag, auto online_tag) {
    update_group<decltype(target_tag), decltype(online_tag)>(targets, onlines, keep, take);
  });
}

}  // namespace

// Registered into fastcl._C by csrc/bindings.cpp.
void bind_momentum(pybind11::module_& m) {
  m.def("momentum_update_", &momentum_update_,
        "target[i] <- momentum * target[i] + (1 - momentum) * online[i], in place, for one group "
        "of dense CPU tensors (one target dtype, one online dtype)",
        pybind11::arg("target"), pybind11::arg("online"), pybind11::arg("momentum"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
