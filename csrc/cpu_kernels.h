// Shared set-up of the vectorized CPU kernel files (csrc/dino.cpp, csrc/sinkhorn.cpp,
// csrc/siglip.cpp).
//
// The extension is compiled for the baseline x86-64 ISA, where ATen's at::vec falls back to
// scalar loops. Including this header (as the file's first include of ATen's vec headers) compiles
// at::vec and the code that follows it for AVX2 + FMA + F16C, up to FASTCL_END_AVX2_KERNELS:
//
//   #include "cpu_kernels.h"
//   namespace { ... kernels using at::vec ... }
//   FASTCL_END_AVX2_KERNELS
//   ... entry points: fastcl::require_avx2("Sinkhorn") before running a kernel
//
// at::vec then lives in the inline namespace at::vec::AVX2 and the kernels have internal linkage,
// so no baseline code can link to AVX2 code; the entry points check the CPU at run time. Other
// compilers and architectures get at::vec's default for the target (NEON on arm64, scalar loops
// otherwise), and so do builds that enable AVX2 themselves (e.g. -march=native).
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace fastcl {

/// Fails with a clear message on a CPU without the ISA the kernels were compiled for.
inline void require_avx2(const char* family) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__AVX2__)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  TORCH_CHECK(supported, "fastcl's ", family, " CPU kernels need a CPU with AVX2, FMA and F16C; ",
              "run the PyTorch reference instead with FASTCL_CPU_BACKEND=reference");
#else
  (void)family;
#endif
}

}  // namespace fastcl

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__AVX2__)
#define FASTCL_TARGET_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// GCC's C++ front end does not define the ISA macros for a target pragma, and sleef.h declares
// its 8-lane functions (which at::vec calls) only under them: defined for the vec headers alone.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#elif defined(__AVX2__) && defined(__FMA__)
// Compiled for AVX2 already: at::vec only needs to be told.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#ifdef FASTCL_TARGET_AVX2
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#define FASTCL_END_AVX2_KERNELS _Pragma("GCC pop_options")
#else
#define FASTCL_END_AVX2_KERNELS
#endif
