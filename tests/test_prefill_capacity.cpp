// SPDX-License-Identifier: Apache-2.0
// Prefill checks capacity for the whole prompt before it touches the cache. For DMS the check must
// be exact: a prompt that fits only because flagged tokens free their slots must be accepted, and
// one page less must be rejected.
#include <catch2/catch.hpp>
#include <vector>

#include "dms/dms.hpp"

namespace {

// All tokens flagged with window w: a row never holds more than w + 1 slots.
bool prefill_fits(int max_pages, int window, int tokens, int page_size) {
  dms::cache_config cfg;
  cfg.num_kv_heads = 2;
  cfg.group_size = 2;
  cfg.head_dim = 4;
  cfg.page_size = page_size;
  cfg.max_pages = max_pages;
  cfg.max_sequences = 1;
  cfg.max_row_slots = 1024;
  dms::paged_cache<float, dms::dms_policy> cache(cfg, dms::dms_policy{{.window = window}});
  const int seq = cache.add_sequence();
  const auto qn = std::size_t(cfg.num_query_heads() * cfg.head_dim),
             kn = std::size_t(cfg.num_kv_heads * cfg.head_dim);
  std::vector<float> q(tokens * qn, 0.25f), k(tokens * kn, 0.5f), out(tokens * qn);
  std::vector<float> logits(tokens * cfg.num_kv_heads, 3.0f);
  try {
    dms::reference::prefill(cache, seq, {q, k, k, logits}, 7, {out});
  } catch (const dms::error& e) {
    REQUIRE(cache.stats().pages_in_use == 0);  // nothing was applied
    REQUIRE(std::string(e.what()).find("page pool exhausted") != std::string::npos);
    return false;
  }
  REQUIRE(cache.stats().live_slots == 2 * std::min(tokens, window + 1));
  return true;
}

}  // namespace

TEST_CASE("prefill capacity check is exact for DMS", "[prefill][dms][errors]") {
  // window 5 -> 6 slots per row -> 2 pages of 4 per row, 4 pages for the 2 rows.
  CHECK(prefill_fits(4, 5, 100, 4));
  CHECK_FALSE(prefill_fits(3, 5, 100, 4));
  // window 0 -> 1 slot per row.
  CHECK(prefill_fits(2, 0, 50, 4));
  CHECK_FALSE(prefill_fits(1, 0, 50, 4));
  // Window longer than the prompt: nothing is reused, every token needs a slot.
  CHECK(prefill_fits(2 * 5, 64, 20, 4));
  CHECK_FALSE(prefill_fits(2 * 5 - 1, 64, 20, 4));
}
