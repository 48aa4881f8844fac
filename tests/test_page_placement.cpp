// SPDX-License-Identifier: Apache-2.0
// page_placement::adjacent: the free-set's three rules, a row's pages in long runs where the
// stack interleaves them, and nothing but the page ids changing: the same steps on a stack and an
// adjacent cache give the same outputs, positions, K/V, scores and bounds bit for bit, the same
// capacity, the same errors, and images that load into either.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <set>
#include <span>
#include <vector>

#include "dms/cpu.hpp"
#include "dms/dms.hpp"
#include "support/cpu_cases.hpp"

namespace {

using dms::page_placement;
using dms_test::cpu_rng;
using dms_test::policy_kind;
using free_set = dms::detail::adjacent_free_set;

dms::cache_config placement_config(int page_size, int max_pages) {
  dms::cache_config cfg;
  cfg.num_kv_heads = 4;
  cfg.group_size = 2;
  cfg.head_dim = 24;
  cfg.page_size = page_size;
  cfg.max_sequences = 3;
  cfg.max_row_slots = 512;
  cfg.max_pages = max_pages;
  return cfg;
}

/// Page breaks summed over the rows of `seq`: consecutive pages of a row that are not adjacent.
template <class C>
int page_breaks(const C& cache, int seq) {
  const auto vw = cache.view();
  int breaks = 0;
  for (int h = 0; h < cache.config().num_kv_heads; ++h) {
    const int r = cache.row_index(seq, h);
    for (int p = 1; p < vw.num_pages(r); ++p) breaks += vw.page(r, p) != vw.page(r, p - 1) + 1;
  }
  return breaks;
}

/// The two caches hold the same rows: positions, K/V, scores and Quest bounds of every slot and
/// logical page, and the same counters, whatever pages they live in.
template <class T, class P>
void require_same_rows(const dms::paged_cache<T, P>& a, const dms::paged_cache<T, P>& b,
                       bool same_reads = true) {
  const auto& cfg = a.config();
  const auto va = a.view(), vb = b.view();
  for (const int s : a.sequences()) {
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      const int r = a.row_index(s, h);
      INFO("sequence " << s << ", head " << h);
      REQUIRE(va.row_length[r] == vb.row_length[r]);
      for (int slot = 0; slot < va.row_length[r]; ++slot) {
        const auto ia = va.slot_index(r, slot), ib = vb.slot_index(r, slot);
        REQUIRE(va.position[ia] == vb.position[ib]);
        REQUIRE(std::memcmp(va.key(r, slot), vb.key(r, slot), sizeof(T) * cfg.head_dim) == 0);
        REQUIRE(std::memcmp(va.value(r, slot), vb.value(r, slot), sizeof(T) * cfg.head_dim) == 0);
        if (va.score) REQUIRE(std::memcmp(va.score + ia, vb.score + ib, sizeof(float)) == 0);
      }
      if (va.page_min)
        for (int p = 0; p < va.num_pages(r); ++p)
          for (const bool upper : {false, true}) {
            const float* ba =
                (upper ? va.page_max : va.page_min) + std::size_t(va.page(r, p)) * cfg.head_dim;
            const float* bb =
                (upper ? vb.page_max : vb.page_min) + std::size_t(vb.page(r, p)) * cfg.head_dim;
            REQUIRE(std::memcmp(ba, bb, sizeof(float) * cfg.head_dim) == 0);
          }
    }
  }
  const auto sa = a.stats(), sb = b.stats();
  REQUIRE(sa.tokens_seen == sb.tokens_seen);
  REQUIRE(sa.live_slots == sb.live_slots);
  if (same_reads) REQUIRE(sa.kv_token_reads == sb.kv_token_reads);  // not part of an image
}

}  // namespace

TEST_CASE("adjacent_free_set: the next page, else the middle of the longest free run",
          "[placement]") {
  free_set fs(200);
  REQUIRE(fs.size() == 200);
  REQUIRE(fs.pick(-1) == 0);  // the run that begins the pool: its start
  fs.erase(0);
  REQUIRE(fs.pick(0) == 1);                    // after page 0: page 1
  REQUIRE(fs.pick(-1) == 1 + 199 / 2);         // a new row: the middle of [1, 200)
  REQUIRE(fs.pick(7) == 8);                    // any free next page
  REQUIRE(fs.pick(199) == 100);                // past the pool's end: a new run
  for (int p = 64; p < 128; ++p) fs.erase(p);  // a whole word of used pages
  // Runs [1, 64) and [128, 200): the longer one, across the word boundary at 192.
  REQUIRE(fs.pick(-1) == 128 + 72 / 2);
  REQUIRE(fs.pick(63) == 128 + 36);  // page 64 is used: a new run
  for (int p = 129; p < 200; ++p) fs.erase(p);
  REQUIRE(fs.pick(-1) == 1 + 63 / 2);  // now [1, 64) is the longest; [128, 129) is one page
  fs.erase(32);
  REQUIRE(fs.pick(-1) == 1 + 31 / 2);  // [1, 32) and [33, 64) tie at 31: the lower one
  REQUIRE(fs.size() == 200 - 1 - 64 - 71 - 1);
  REQUIRE_FALSE(fs.contains(0));
  REQUIRE(fs.contains(128));
  REQUIRE_FALSE(fs.contains(-1));
  REQUIRE_FALSE(fs.contains(200));

  // to_list / assign round-trip; the list runs highest first.
  const auto list = fs.to_list();
  REQUIRE(int(list.size()) == fs.size());
  REQUIRE(std::is_sorted(list.rbegin(), list.rend()));
  free_set copy(200);
  copy.assign(list);
  REQUIRE(copy.to_list() == list);
  REQUIRE(copy.pick(-1) == fs.pick(-1));

  // One free page left: it is what any row gets.
  free_set one(130);
  for (int p = 0; p < 130; ++p)
    if (p != 70) one.erase(p);
  REQUIRE(one.pick(-1) == 70);
  REQUIRE(one.pick(3) == 70);
  REQUIRE(one.pick(69) == 70);
  one.insert(71);
  REQUIRE(one.pick(-1) == 71);  // [70, 72): its middle
  REQUIRE(one.size() == 2);
}

TEST_CASE("adjacent placement keeps a row's pages in runs where the stack interleaves them",
          "[placement]") {
  const int page_size = GENERATE(1, 4, 16);
  auto cfg = placement_config(page_size, 2 * 4 * 40);
  cfg.max_row_slots = 40 * page_size;
  dms::paged_cache<float, dms::dense_policy> stack(cfg),
      adjacent(cfg, {}, page_placement::adjacent);
  REQUIRE(stack.placement() == page_placement::stack);
  REQUIRE(adjacent.placement() == page_placement::adjacent);
  const std::vector<float> kv(std::size_t(cfg.num_kv_heads) * cfg.head_dim, 0.5f);
  std::vector<int> seqs;
  for (int s = 0; s < 2; ++s) {
    seqs.push_back(stack.add_sequence());
    REQUIRE(adjacent.add_sequence() == seqs.back());
  }
  const int tokens = 40 * page_size;  // 40 pages per row
  for (int t = 0; t < tokens; ++t)    // token-major, every head at once: as an engine appends
    for (const int s : seqs) {
      stack.append(s, kv, kv);
      adjacent.append(s, kv, kv);
    }
  for (const int s : seqs) {
    INFO("page size " << page_size << ", sequence " << s);
    // 8 rows in lockstep: the stack hands out their pages in turn, one break per page.
    CHECK(page_breaks(stack, s) == cfg.num_kv_heads * 39);
    // Adjacent: the 8 rows split the exactly fitting pool evenly, each into one run.
    CHECK(page_breaks(adjacent, s) == 0);
  }
  require_same_rows(stack, adjacent);
}

TEST_CASE("adjacent placement changes page ids only: every policy decodes bit for bit the same",
          "[placement][cpu]") {
  const policy_kind kind = GENERATE(
      from_range(std::begin(dms_test::all_policy_kinds), std::end(dms_test::all_policy_kinds)));
  const int page_size = GENERATE(1, 4, 16);
  INFO(dms_test::policy_kind_name(kind) << ", page size " << page_size);
  // A pool with little slack, so that freed pages fragment it and all three rules run.
  const auto cfg = placement_config(page_size, 3 * 4 * (200 / page_size + 2));
  dms_test::with_policy(kind, 160, page_size, [&](auto policy) {
    using P = decltype(policy);
    dms::paged_cache<dms::bfloat16, P> stack(cfg, policy),
        adjacent(cfg, policy, page_placement::adjacent);
    dms::cpu::thread_pool pool(2);
    cpu_rng rng{0x5eed + std::uint64_t(page_size)};
    std::vector<int> seqs;
    for (int s = 0; s < 3; ++s) {
      seqs.push_back(stack.add_sequence());
      REQUIRE(adjacent.add_sequence() == seqs.back());
    }
    const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
    const std::size_t kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
    const std::size_t n = seqs.size();
    for (int step = 0; step < 180; ++step) {
      INFO("step " << step);
      if (step == 90) {  // free a sequence's pages in the middle of the pool, then refill it
        stack.remove_sequence(seqs[1]);
        adjacent.remove_sequence(seqs[1]);
        REQUIRE(stack.add_sequence() == seqs[1]);
        REQUIRE(adjacent.add_sequence() == seqs[1]);
      }
      std::vector<float> q(n * qn), k(n * kn), v(n * kn), logits(n * cfg.num_kv_heads);
      rng.fill(q);
      rng.fill(k);
      rng.fill(v);
      for (float& l : logits) l = rng.uniform() < 0.6 ? 2.0f : -2.0f;
      std::vector<float> out_s(n * qn), out_a(n * qn);
      dms::cpu::decode_step(stack, std::span<const int>(seqs), q, k, v, logits, out_s, {}, pool);
      dms::cpu::decode_step(adjacent, std::span<const int>(seqs), q, k, v, logits, out_a, {}, pool);
      REQUIRE(std::memcmp(out_s.data(), out_a.data(), sizeof(float) * out_s.size()) == 0);
    }
    require_same_rows(stack, adjacent);
    REQUIRE(stack.stats().pages_in_use == adjacent.stats().pages_in_use);
  });
}

TEST_CASE("adjacent placement: the same capacity, exhaustion an error that changes nothing",
          "[placement]") {
  const int page_size = 4;
  auto cfg = placement_config(page_size, 35);  // fewer pages than three long rows need
  cfg.num_kv_heads = 2;
  dms::paged_cache<float, dms::dense_policy> stack(cfg),
      adjacent(cfg, {}, page_placement::adjacent);
  const std::vector<float> kv(std::size_t(cfg.num_kv_heads) * cfg.head_dim, 1.0f);
  for (int s = 0; s < 3; ++s) {
    REQUIRE(stack.add_sequence() == s);
    REQUIRE(adjacent.add_sequence() == s);
  }
  int appended = 0;
  for (;; ++appended) {
    const int s = appended % 3;
    bool stack_full = false, adjacent_full = false;
    try {
      stack.append(s, kv, kv);
    } catch (const dms::error&) {
      stack_full = true;
    }
    const auto before = adjacent.to_image();
    try {
      adjacent.append(s, kv, kv);
    } catch (const dms::error& e) {
      adjacent_full = true;
      REQUIRE_THAT(e.what(), Catch::Contains("max_pages"));
      const auto after = adjacent.to_image();  // unchanged, free list included
      REQUIRE(after.free_top == before.free_top);
      REQUIRE(after.page_table == before.page_table);
      REQUIRE(after.row_length == before.row_length);
      REQUIRE(std::equal(after.free_pages.begin(), after.free_pages.begin() + after.free_top,
                         before.free_pages.begin()));
    }
    REQUIRE(stack_full == adjacent_full);
    if (adjacent_full) break;
  }
  // Full when a token's pages (one per head) no longer fit: every page but fewer than a token's
  // worth handed out first, under both placements alike.
  REQUIRE(adjacent.stats().pages_in_use == stack.stats().pages_in_use);
  REQUIRE(adjacent.stats().pages_in_use > cfg.max_pages - cfg.num_kv_heads);
  REQUIRE(appended > 0);
  require_same_rows(stack, adjacent);
  // Freeing a sequence makes its pages usable again, under the adjacent rule.
  adjacent.remove_sequence(1);
  REQUIRE(adjacent.add_sequence() == 1);
  adjacent.append(1, kv, kv);
  REQUIRE(adjacent.stats().pages_in_use < cfg.max_pages);
}

TEST_CASE("images move between stack and adjacent caches and keep decoding the same",
          "[placement][cpu]") {
  const auto cfg = placement_config(4, 3 * 4 * 64);
  const dms::dms_policy policy{{.window = 8}};
  dms::paged_cache<float, dms::dms_policy> stack(cfg, policy),
      adjacent(cfg, policy, page_placement::adjacent),
      from_stack(cfg, policy, page_placement::adjacent), from_adjacent(cfg, policy);
  cpu_rng rng{77};
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * cfg.head_dim;
  const std::size_t kn = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  const int seq = stack.add_sequence();
  REQUIRE(adjacent.add_sequence() == seq);
  const auto step_all = [&](std::initializer_list<dms::paged_cache<float, dms::dms_policy>*> caches,
                            int steps) {
    for (int t = 0; t < steps; ++t) {
      std::vector<float> q(qn), k(kn), v(kn), logits(std::size_t(cfg.num_kv_heads));
      rng.fill(q);
      rng.fill(k);
      rng.fill(v);
      for (float& l : logits) l = rng.uniform() < 0.5 ? 2.0f : -2.0f;
      std::vector<float> first;
      for (auto* c : caches) {
        std::vector<float> out(qn);
        dms::cpu::decode_step(*c, seq, q, k, v, logits, out);
        if (first.empty()) first = out;
        REQUIRE(std::memcmp(first.data(), out.data(), sizeof(float) * qn) == 0);
      }
    }
  };
  step_all({&stack, &adjacent}, 70);
  from_stack.load_image(stack.to_image());
  from_adjacent.load_image(adjacent.to_image());
  REQUIRE(from_stack.placement() == page_placement::adjacent);
  REQUIRE(from_adjacent.placement() == page_placement::stack);
  require_same_rows(stack, from_stack, false);
  require_same_rows(stack, from_adjacent, false);
  step_all({&stack, &adjacent, &from_stack, &from_adjacent}, 70);
  require_same_rows(stack, from_stack, false);
  require_same_rows(stack, from_adjacent, false);
  REQUIRE(page_breaks(adjacent, seq) < page_breaks(stack, seq));
}
