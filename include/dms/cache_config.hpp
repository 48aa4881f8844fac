// SPDX-License-Identifier: Apache-2.0
#pragma once

// Shape and capacity of one layer's KV cache. Plain data, validated once in the cache's
// constructor (validate() names the first bad field and its valid range) before anything is
// allocated. Every size derived from it is checked against a documented limit, in 64-bit
// arithmetic, so no product of fields can overflow.

#include <cstddef>
#include <cstdint>

#include "dms/config.hpp"
#include "dms/error.hpp"

DMS_NAMESPACE_BEGIN

struct cache_config {
  /// KV heads of the layer. A row of the cache is one (sequence, KV head) pair.
  int num_kv_heads = 8;
  /// Query heads per KV head (GQA group size G); 1 = multi-head attention.
  int group_size = 4;
  /// Channels per head (the same for K, V and Q).
  int head_dim = 128;
  /// Tokens per page. Pages are the unit of allocation and of Quest's page metadata.
  int page_size = 16;
  /// Pages in the layer's pool: the memory budget. Running out is an error, never an overwrite.
  int max_pages = 4096;
  /// Sequences the cache can hold at once (their ids are reused after remove_sequence).
  int max_sequences = 16;
  /// Slots a single row may hold; sizes each row's page table (max_row_slots / page_size pages).
  int max_row_slots = 1 << 16;

  static constexpr int max_head_dim = 1024;
  static constexpr int max_group_size = 64;
  static constexpr int max_page_size = 4096;
  /// Limits on derived sizes (see validate()).
  static constexpr std::int64_t max_pool_slots = std::int64_t{1} << 30;  // max_pages * page_size
  static constexpr std::int64_t max_rows_limit = std::int64_t{1} << 24;  // sequences * KV heads
  static constexpr std::int64_t max_page_table_entries = std::int64_t{1} << 28;  // 1 GiB of int32
  /// K + V + per-slot and per-page metadata of one layer's pool: 1 TiB, more than any device
  /// holds. A pool under the limit that the machine cannot allocate is a dms::error too.
  static constexpr std::int64_t max_pool_bytes = std::int64_t{1} << 40;

  [[nodiscard]] constexpr int num_query_heads() const { return num_kv_heads * group_size; }
  [[nodiscard]] constexpr int max_rows() const { return max_sequences * num_kv_heads; }
  [[nodiscard]] constexpr int max_pages_per_row() const {
    return (max_row_slots + page_size - 1) / page_size;
  }

  friend constexpr bool operator==(const cache_config&, const cache_config&) = default;

  /// Bytes of a page pool with `element_bytes` per K/V element (64-bit, never overflows for a
  /// config whose fields are in range).
  [[nodiscard]] constexpr std::int64_t pool_bytes(std::size_t element_bytes, bool with_scores,
                                                  bool with_bounds) const {
    const std::int64_t slots = std::int64_t{max_pages} * page_size;
    std::int64_t bytes = 2 * slots * head_dim * std::int64_t(element_bytes) + slots * 4;
    if (with_scores) bytes += slots * 4;
    if (with_bounds) bytes += 2 * std::int64_t{max_pages} * head_dim * 4;
    return bytes;
  }

  /// Throws dms::error naming the first invalid field, or the first derived size over its limit.
  void validate() const {
    detail::check_range("cache_config.num_kv_heads", num_kv_heads, 1, 1024);
    detail::check_range("cache_config.group_size", group_size, 1, max_group_size);
    detail::check_range("cache_config.head_dim", head_dim, 1, max_head_dim);
    detail::check_range("cache_config.page_size", page_size, 1, max_page_size);
    detail::check_range("cache_config.max_pages", max_pages, 1, max_pool_slots / page_size);
    detail::check_range("cache_config.max_sequences", max_sequences, 1, 1 << 20);
    detail::check_range("cache_config.max_row_slots", max_row_slots, 1, 1 << 30);
    // Rows and page tables are allocated up front (kernels index them directly): keep them small
    // enough to allocate. 64-bit products, so fields in range cannot overflow here.
    const std::int64_t rows = std::int64_t{max_sequences} * num_kv_heads;
    if (rows > max_rows_limit)
      detail::fail("cache_config: max_sequences * num_kv_heads = ", max_sequences, " * ",
                   num_kv_heads, " = ", rows, " rows is outside the valid range [1, ",
                   max_rows_limit, "] (cache_config::max_rows_limit)");
    const auto table = rows * max_pages_per_row();
    if (table > max_page_table_entries)
      detail::fail(
          "cache_config: max_sequences * num_kv_heads * ceil(max_row_slots / page_size) = ", table,
          " page-table entries is outside the valid range [1, ", max_page_table_entries,
          "] (cache_config::max_page_table_entries)");
  }

  /// validate(), plus the pool's byte count for `element_bytes` per K/V element against
  /// max_pool_bytes.
  void validate(std::size_t element_bytes, bool with_scores, bool with_bounds) const {
    validate();
    const std::int64_t bytes = pool_bytes(element_bytes, with_scores, with_bounds);
    if (bytes > max_pool_bytes)
      detail::fail("cache_config: the page pool (max_pages = ", max_pages,
                   " * page_size = ", page_size, " slots * head_dim = ", head_dim,
                   ", K and V) needs ", bytes, " bytes, outside the valid range [1, ",
                   max_pool_bytes, "] (cache_config::max_pool_bytes)");
  }
};

DMS_NAMESPACE_END
