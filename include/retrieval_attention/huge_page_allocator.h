// retrieval_attention/huge_page_allocator.h -- std::allocator replacement for the large arrays that searches
// read at random (key rows, graph adjacency).
//
// Contract
//   * HugePageAllocator<T> is a stateless std::allocator drop-in. Blocks of at least kHugePage bytes are
//     aligned to kHugePage and, on Linux, marked MADV_HUGEPAGE, so that transparent huge pages back them
//     when the kernel's THP mode is "madvise" (the common default) as well as "always".
//   * Why: a decode step visits a few thousand random rows of a 32 MiB-per-head key array and a similarly
//     sized adjacency array; with 4 KiB pages nearly every visit also misses the TLB. 2 MiB pages keep a
//     head's arrays within the TLB's reach.
//   * Smaller blocks, other systems, or a refused madvise: plain aligned memory, same behaviour.
//   * Thread-safety: as operator new/delete.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace retrieval_attention {

inline constexpr size_t kHugePage = size_t{2} << 20;

template <class T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() noexcept = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    const size_t bytes = n * sizeof(T);
    if (bytes < kHugePage) {
      void* p = ::operator new(bytes, std::align_val_t{alignof(T) > 64 ? alignof(T) : 64});
      return static_cast<T*>(p);
    }
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;  // aligned_alloc needs a multiple
    void* p = std::aligned_alloc(kHugePage, rounded);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advice only: a refusal leaves ordinary pages
#endif
    return static_cast<T*>(p);
  }

  void deallocate(T* p, size_t n) noexcept {
    if (n * sizeof(T) < kHugePage) {
      ::operator delete(p, std::align_val_t{alignof(T) > 64 ? alignof(T) : 64});
    } else {
      std::free(p);
    }
  }

  template <class U>
  bool operator==(const HugePageAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const HugePageAllocator<U>&) const noexcept { return false; }
};

template <class T>
using HugePageVector = std::vector<T, HugePageAllocator<T>>;

}  // namespace retrieval_attention
