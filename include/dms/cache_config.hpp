// SPDX-License-Identifier: Apache-2.0
#pragma once

// Shape and capacity of one layer's KV cache. Plain data, validated once in the cache's
// constructor (validate() names the first bad field and its valid range).

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

  [[nodiscard]] constexpr int num_query_heads() const { return num_kv_heads * group_size; }
  [[nodiscard]] constexpr int max_rows() const { return max_sequences * num_kv_heads; }
  [[nodiscard]] constexpr int max_pages_per_row() const {
    return (max_row_slots + page_size - 1) / page_size;
  }

  friend constexpr bool operator==(const cache_config&, const cache_config&) = default;

  /// Throws dms::error naming the first invalid field.
  void validate() const {
    detail::check_range("cache_config.num_kv_heads", num_kv_heads, 1, 1024);
    detail::check_range("cache_config.group_size", group_size, 1, max_group_size);
    detail::check_range("cache_config.head_dim", head_dim, 1, max_head_dim);
    detail::check_range("cache_config.page_size", page_size, 1, max_page_size);
    detail::check_range("cache_config.max_pages", max_pages, 1, (1 << 30) / page_size);
    detail::check_range("cache_config.max_sequences", max_sequences, 1, 1 << 20);
    detail::check_range("cache_config.max_row_slots", max_row_slots, 1, 1 << 30);
    // Page tables are dense [max_rows][max_pages_per_row] int32 arrays; keep them addressable.
    const auto table = std::int64_t{max_rows()} * max_pages_per_row();
    if (table > (std::int64_t{1} << 31) - 1)
      detail::fail(
          "cache_config: max_sequences * num_kv_heads * ceil(max_row_slots / page_size) = ", table,
          " page-table entries exceeds 2^31 - 1");
  }
};

DMS_NAMESPACE_END
