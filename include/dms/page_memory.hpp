// SPDX-License-Identifier: Apache-2.0
#pragma once

// The allocator of the page pool's K/V arrays. Decode attention walks a row's pages, which lie
// far apart in the pool (pages are handed out as rows grow, interleaved across rows), so every
// page of a long row is a TLB miss with 4 KiB virtual-memory pages. Large arrays therefore get
// 2 MiB alignment and, on Linux, madvise(MADV_HUGEPAGE), so that transparent huge pages back
// them where the kernel allows it (THP "madvise" or "always"); elsewhere, or when the kernel
// says no, it is plain aligned memory. Nothing else changes: the memory is value-initialized by
// the vector as before.

#include <cstddef>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN

template <class T>
struct page_memory_allocator {
  using value_type = T;
  /// Arrays of at least this many bytes are 2 MiB aligned and advised to use huge pages.
  static constexpr std::size_t huge_threshold = std::size_t(2) << 20;
  static constexpr std::size_t huge_alignment = std::size_t(2) << 20;

  page_memory_allocator() = default;
  template <class U>
  constexpr page_memory_allocator(const page_memory_allocator<U>&) noexcept {}

  [[nodiscard]] T* allocate(std::size_t n) {
    if (n > std::size_t(-1) / sizeof(T)) throw std::bad_array_new_length();
    const std::size_t bytes = n * sizeof(T);
    if (bytes < huge_threshold)
      return static_cast<T*>(
          ::operator new(bytes, std::align_val_t(alignof(T) > 64 ? alignof(T) : 64)));
    // Round up to whole huge pages so that the advice covers the tail too.
    const std::size_t rounded = (bytes + huge_alignment - 1) / huge_alignment * huge_alignment;
    void* p = ::operator new(rounded, std::align_val_t(huge_alignment));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)::madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure leaves 4 KiB pages
#endif
    return static_cast<T*>(p);
  }

  void deallocate(T* p, std::size_t n) noexcept {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < huge_threshold)
      ::operator delete(p, std::align_val_t(alignof(T) > 64 ? alignof(T) : 64));
    else
      ::operator delete(p, std::align_val_t(huge_alignment));
  }

  template <class U>
  friend constexpr bool operator==(const page_memory_allocator&,
                                   const page_memory_allocator<U>&) noexcept {
    return true;
  }
};

DMS_NAMESPACE_END
