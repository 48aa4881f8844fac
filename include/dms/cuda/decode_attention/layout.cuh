// SPDX-License-Identifier: Apache-2.0
#pragma once

// What the three decode kernels share: log2 constants, the page-size divide, a batch row's read
// domain (row_reader), the cache arrays and batch (batch_layout), and the temporary storage
// regions (temp_layout). Part of dms/cuda/decode_attention.cuh, whose header comment describes the
// three kernels.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_attention/layout.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dms/config.hpp"
#include "dms/cuda/decode_attention/options.cuh"

DMS_NAMESPACE_BEGIN
namespace cuda {
namespace detail {
namespace decode {

constexpr float log2e = 1.4426950408889634f;
constexpr float ln2 = 0.6931471805599453f;

DMS_DEVICE float neg_inf() {
  return __uint_as_float(0xff800000u);
}

// Division by the page size: a shift for a power of two (the usual case), else a divide.
struct page_div {
  int size;
  int shift;  // log2(size), or -1 if size is not a power of two
  DMS_HOST_DEVICE int div(int x) const { return shift >= 0 ? x >> shift : x / size; }
  DMS_HOST_DEVICE int mod(int x) const { return shift >= 0 ? x & (size - 1) : x % size; }
};

inline page_div make_page_div(int size) {
  int shift = -1;
  if ((size & (size - 1)) == 0) {
    shift = 0;
    while ((1 << shift) < size) ++shift;
  }
  return {size, shift};
}

// What one batch row reads: index j of its read domain -> physical slot index, or -1 when j
// reads nothing (a hole, a slot past the row's length, a page id outside the row). The domain
// is [0, length) without a page list, [0, count * page_size) with one.
struct row_reader {
  const std::int32_t* table;     // the row's page-table entries
  const std::int32_t* pages;     // the row's selected logical pages, or null
  const std::int32_t* position;  // [max_pages * page_size]
  int length;
  int num_pages;
  page_div P;

  DMS_DEVICE int slot(int j) const {
    const int lp = pages ? pages[P.div(j)] : P.div(j);
    const int off = P.mod(j);
    if (lp < 0 || lp >= num_pages || lp * P.size + off >= length) return -1;
    const int page = table[lp];
    if (page < 0) return -1;
    const int at = page * P.size + off;
    return position[at] >= 0 ? at : -1;
  }
};

// The cache arrays and the batch description the three kernels share.
struct batch_layout {
  const std::int32_t* seq_ids;      // [batch]
  const std::int32_t* page_table;   // [max_rows][max_pages_per_row]
  const std::int32_t* row_length;   // [max_rows]
  const std::int32_t* position;     // [max_pages * page_size]
  const std::int32_t* pages;        // [rows][page_stride] or null
  const std::int32_t* page_counts;  // [rows] or null
  int page_stride;
  int num_kv_heads;
  int max_pages_per_row;
  int max_rows;
  page_div P;

  // The cache row of batch row i, or -1 if its sequence id is out of range.
  DMS_DEVICE int cache_row(int i) const {
    const std::int64_t seq = seq_ids[i / num_kv_heads];
    const std::int64_t r = seq * num_kv_heads + i % num_kv_heads;
    return seq >= 0 && r < max_rows ? int(r) : -1;
  }
  // Length of the read domain of batch row i.
  DMS_DEVICE int domain(int i) const {
    const int r = cache_row(i);
    if (r < 0) return 0;
    if (pages == nullptr) return row_length[r];
    const int n = page_counts[i];
    return (n < 0 ? 0 : n > page_stride ? page_stride : n) * P.size;
  }
  DMS_DEVICE row_reader reader(int i, int r) const {
    const int len = row_length[r];
    return {page_table + std::int64_t{r} * max_pages_per_row,
            pages ? pages + std::int64_t{i} * page_stride : nullptr,
            position,
            len,
            P.div(len + P.size - 1),
            P};
  }
};

// Temporary storage regions (see the header comment).
struct temp_layout {
  int rows = 0;
  int max_items = 0;
  int target_items = 0;
  int merge_grid = 0;
  std::size_t offsets = 0, work = 0, part_lse = 0, part_out = 0, logits = 0, bytes = 0;
};

inline std::size_t round_up(std::size_t n) {
  return (n + 255) / 256 * 256;
}

inline temp_layout make_layout(int batch, int num_kv_heads, int group_size, int head_dim,
                               int num_sms, std::int64_t fold_slots) {
  temp_layout t;
  t.rows = batch * num_kv_heads;
  t.target_items = num_sms * decode_tuning::items_per_sm;
  t.max_items = t.target_items + t.rows;
  const std::int64_t tasks = std::int64_t{t.rows} + (fold_slots > 0 ? t.max_items : 0);
  const std::int64_t merge_cap = std::int64_t{num_sms} * decode_tuning::merge_blocks_per_sm;
  t.merge_grid = int(tasks < merge_cap ? tasks : merge_cap);
  const auto G = std::size_t(group_size), D = std::size_t(head_dim);
  const auto items = std::size_t(t.max_items);
  std::size_t at = 0;
  t.offsets = at;
  at += round_up(sizeof(std::int32_t) * (std::size_t(t.rows) + 2));
  t.work = at;
  at += round_up(sizeof(int4) * items);
  t.part_lse = at;
  at += round_up(sizeof(float) * items * G);
  t.part_out = at;
  at += round_up(sizeof(float) * items * G * D);
  t.logits = at;
  at += round_up(sizeof(float) * std::size_t(fold_slots > 0 ? fold_slots : 0) * G);
  t.bytes = at;
  return t;
}

}  // namespace decode
}  // namespace detail
}  // namespace cuda
DMS_NAMESPACE_END
