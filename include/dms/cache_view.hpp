// SPDX-License-Identifier: Apache-2.0
#pragma once

// Non-owning, trivially copyable views of one layer's paged cache: what the CPU reference and the
// CUDA kernels take by value. A row is one (sequence, KV head) pair; row r of sequence s and KV
// head h is r = s * num_kv_heads + h. Slot i of a row lives in page page_table[r][i / page_size]
// at offset i % page_size. Slots [0, row_length[r]) are spanned by the row; a slot whose position
// is -1 is a hole left by an eviction, refilled by the next append.

#include <cstdint>
#include <type_traits>

#include "dms/config.hpp"

DMS_NAMESPACE_BEGIN

namespace detail {
template <class From, class To>
using copy_const_t = std::conditional_t<std::is_const_v<From>, const To, To>;
}  // namespace detail

/// T is the K/V storage type, optionally const: cache_view<const half> is a read-only view.
template <class T>
struct cache_view {
  using index_type = std::int32_t;
  using meta_int = detail::copy_const_t<T, std::int32_t>;
  using meta_float = detail::copy_const_t<T, float>;

  T* k;                          // [max_pages][page_size][head_dim] keys, stored after RoPE
  T* v;                          // [max_pages][page_size][head_dim] values
  meta_int* position;            // [max_pages][page_size] token index held by each slot, -1 = hole
  meta_float* score;             // [max_pages][page_size] policy score per slot; null if unused
  meta_float* page_min;          // [max_pages][head_dim] per-channel key minimum; null if unused
  meta_float* page_max;          // [max_pages][head_dim] per-channel key maximum; null if unused
  const index_type* page_table;  // [max_rows][max_pages_per_row] page ids in slot order, -1 = none
  const index_type* row_length;  // [max_rows] slots spanned by each row (live slots + holes)
  int num_kv_heads;              // rows per sequence
  int group_size;                // query heads per KV head
  int head_dim;                  // channels per head
  int page_size;                 // slots per page
  int max_pages_per_row;         // row stride of page_table
  int max_rows;                  // max_sequences * num_kv_heads

  /// Flat index of (row, slot) into the [max_pages * page_size] slot arrays.
  DMS_HOST_DEVICE std::int64_t slot_index(int row, int slot) const {
    const index_type page = page_table[std::int64_t{row} * max_pages_per_row + slot / page_size];
    return std::int64_t{page} * page_size + slot % page_size;
  }
  DMS_HOST_DEVICE T* key(int row, int slot) const { return k + slot_index(row, slot) * head_dim; }
  DMS_HOST_DEVICE T* value(int row, int slot) const { return v + slot_index(row, slot) * head_dim; }
  DMS_HOST_DEVICE int length(int row) const { return row_length[row]; }
  DMS_HOST_DEVICE index_type page(int row, int logical_page) const {
    return page_table[std::int64_t{row} * max_pages_per_row + logical_page];
  }
  DMS_HOST_DEVICE int num_pages(int row) const {
    return (row_length[row] + page_size - 1) / page_size;
  }
  /// The same cache, read-only: what the device attention and selection entry points take.
  DMS_HOST_DEVICE cache_view<const T> read_only() const {
    return {k,        v,          position,          score,        page_min,
            page_max, page_table, row_length,        num_kv_heads, group_size,
            head_dim, page_size,  max_pages_per_row, max_rows};
  }
};

static_assert(std::is_trivially_copyable_v<cache_view<float>>);
static_assert(std::is_trivially_copyable_v<cache_view<const float>>);

DMS_NAMESPACE_END
