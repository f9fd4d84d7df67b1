// Input checks shared by the CPU entry points (csrc/*.cpp): each error names the argument.
//
// The Python layer (fastcl/_checks.py) checks the public arguments first; these guard the ops
// themselves (torch.ops.fastcl.*), whose inputs the kernels read without further checks.
//
// Include this header before cpu_kernels.h: its inline functions must be compiled for the
// baseline ISA, not inside cpu_kernels.h's AVX2 region (the linker keeps one copy of each).
#pragma once

#include <torch/extension.h>

namespace fastcl {

/// x: a defined CPU tensor.
inline void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), name, " is undefined");
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got device ", x.device());
}

/// x: a floating-point CPU tensor.
inline void check_cpu_float(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be a floating-point tensor, got ",
              x.scalar_type());
}

/// x: a floating-point CPU tensor -> contiguous float32 (no copy when it is one already).
inline at::Tensor contiguous_float(const at::Tensor& x, const char* name) {
  check_cpu_float(x, name);
  return x.to(at::kFloat).contiguous();
}

/// scale: a 0-dim floating-point CPU tensor -> its value, read in double and rounded once.
inline float read_scale(const at::Tensor& scale, const char* name = "scale") {
  check_cpu_float(scale, name);
  TORCH_CHECK(scale.dim() == 0, name, " must be a 0-dim tensor, got shape ", scale.sizes());
  return static_cast<float>(scale.item<double>());
}

/// Calls fn(ptr) with x's data as const float*, const at::BFloat16* or const at::Half*.
template <typename Fn>
void with_float_data(const at::Tensor& x, const char* name, Fn&& fn) {
  switch (x.scalar_type()) {
    case at::kFloat: return fn(x.const_data_ptr<float>());
    case at::kBFloat16: return fn(x.const_data_ptr<at::BFloat16>());
    case at::kHalf: return fn(x.const_data_ptr<at::Half>());
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ",
                         x.scalar_type());
  }
}

}  // namespace fastcl
