// Output buffers that a training loop drops every step, kept to be handed out again.
//
// SwAV drops its codes and a training loop its gradients (zero_grad) before the next step. glibc
// hands a freed block over 32 MiB (its largest mmap threshold) back to the OS, so a fresh output
// that large page-faults on every page, every step: as much time as the kernel that fills it, and
// several-fold more on a busy machine (benchmarks/README.md, "First-touch page faults"). A
// KeptOutput keeps the storage of the last output of one call site and hands it out again once
// nothing else refers to it, as a GPU caching allocator would; fastcl._C.empty_cache() drops them.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastcl {

/// Asks for transparent huge pages for a fresh output buffer (Linux, THP in "madvise" mode).
/// First-touch faults on 4 KiB pages of a large fresh output cost as much as the computation
/// that fills it; 2 MiB pages fault 512 times less often.
inline void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

/// The storage of the last output handed out at one call site (a function-local static).
struct KeptOutput;

inline std::mutex& kept_outputs_mutex() {
  static std::mutex mutex;
  return mutex;
}

/// Every KeptOutput of the process (one per call site, registered on first use).
inline std::vector<KeptOutput*>& kept_outputs() {
  static std::vector<KeptOutput*> all;
  return all;
}

struct KeptOutput {
  c10::Storage storage;
  KeptOutput() { kept_outputs().push_back(this); }  // constructed under kept_outputs_mutex()
};

/// A contiguous output of `sizes` for a kernel that writes every element: the kept storage of
/// this call site once nothing else refers to it (use count 1, same size), else a fresh tensor
/// (huge pages advised), which becomes the kept one.
template <typename Site>
at::Tensor kept_or_new(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes =
      c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  std::lock_guard<std::mutex> lock(kept_outputs_mutex());
  static KeptOutput kept;
  if (kept.storage && kept.storage.use_count() == 1 &&
      static_cast<int64_t>(kept.storage.nbytes()) == bytes) {
    std::vector<int64_t> strides(sizes.size(), 1);
    for (int64_t i = static_cast<int64_t>(sizes.size()) - 2; i >= 0; --i) {
      strides[i] = strides[i + 1] * std::max<int64_t>(sizes[i + 1], 1);
    }
    return at::empty({0}, options).set_(kept.storage, 0, sizes, strides);
  }
  kept.storage = {};  // a buffer of another size, or in use: let it go before allocating
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  kept.storage = out.storage();
  return out;
}

/// Drops every kept output (fastcl._C.empty_cache): the next call allocates afresh.
inline void empty_kept_outputs() {
  std::lock_guard<std::mutex> lock(kept_outputs_mutex());
  for (KeptOutput* kept : kept_outputs()) kept->storage = {};
}

}  // namespace fastcl
