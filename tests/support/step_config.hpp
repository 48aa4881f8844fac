// SPDX-License-Identifier: Apache-2.0
#pragma once

// step_config: the small cache configuration the batched-step and prompt-compression tests (CPU
// and GPU) build their caches from: up to 6 sequences, rows of up to 4096 slots.

#include "dms/cache_config.hpp"

namespace dms_test {

inline dms::cache_config step_config(int kv_heads, int group, int head_dim, int page_size,
                                     int max_pages) {
  dms::cache_config c;
  c.num_kv_heads = kv_heads;
  c.group_size = group;
  c.head_dim = head_dim;
  c.page_size = page_size;
  c.max_pages = max_pages;
  c.max_sequences = 6;
  c.max_row_slots = 4096;
  return c;
}

}  // namespace dms_test
