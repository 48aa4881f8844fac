// SPDX-License-Identifier: Apache-2.0
// paged_cache as a container: configuration, paging, slot reuse, compaction, sequences, accounting
// and views. The dense policy is used throughout, so tokens leave a row only through explicit
// row_ref::evict calls made by the test.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <set>
#include <span>
#include <type_traits>
#include <vector>

#include "dms/dms.hpp"

namespace {

dms::cache_config small_config(int kv_heads, int head_dim, int page_size) {
  dms::cache_config c;
  c.num_kv_heads = kv_heads;
  c.group_size = 2;
  c.head_dim = head_dim;
  c.page_size = page_size;
  c.max_pages = 256;
  c.max_sequences = 4;
  c.max_row_slots = 1024;
  return c;
}

// Channel c of the key of token `pos` in KV head h of sequence s. Distinct for every argument, so
// a key read back names the token it belongs to. Values are the negation.
float key_of(int seq, int h, int pos, int c) {
  return float(seq * 100000 + pos * 100 + h * 10 + c) / 8.0f;
}
float value_of(int seq, int h, int pos, int c) {
  return -key_of(seq, h, pos, c);
}

template <class T, class P>
void append_token(dms::paged_cache<T, P>& cache, int seq, int pos) {
  const auto& cfg = cache.config();
  std::vector<float> k, v;
  for (int h = 0; h < cfg.num_kv_heads; ++h)
    for (int c = 0; c < cfg.head_dim; ++c) {
      k.push_back(key_of(seq, h, pos, c));
      v.push_back(value_of(seq, h, pos, c));
    }
  cache.append(seq, k, v);
}

// One dense decode step (append + attention + finish) with the same K/V as append_token.
template <class T, class P>
void decode_token(dms::paged_cache<T, P>& cache, int seq, int pos) {
  const auto& cfg = cache.config();
  std::vector<float> k, v, q(std::size_t(cfg.num_query_heads()) * cfg.head_dim, 0.01f);
  std::vector<float> out(q.size());
  for (int h = 0; h < cfg.num_kv_heads; ++h)
    for (int c = 0; c < cfg.head_dim; ++c) {
      k.push_back(key_of(seq, h, pos, c));
      v.push_back(value_of(seq, h, pos, c));
    }
  dms::reference::decode_step(cache, seq, q, k, v, {}, out);
}

template <class C>
int row_of(const C& cache, int seq, int h) {
  return cache.row_index(seq, h);
}

// Every live slot of every row of `seq` holds exactly the K/V that were appended for its position.
template <class T, class P>
void require_keys_match_positions(const dms::paged_cache<T, P>& cache, int seq) {
  const auto& cfg = cache.config();
  const auto view = cache.view();
  for (int h = 0; h < cfg.num_kv_heads; ++h) {
    const int r = row_of(cache, seq, h);
    const auto pos = cache.positions(r);
    for (int s = 0; s < int(pos.size()); ++s) {
      if (pos[s] < 0) continue;
      for (int c = 0; c < cfg.head_dim; ++c) {
        REQUIRE(view.key(r, s)[c] == dms::from_float<T>(key_of(seq, h, pos[s], c)));
        REQUIRE(view.value(r, s)[c] == dms::from_float<T>(value_of(seq, h, pos[s], c)));
      }
    }
  }
}

std::vector<std::int32_t> iota_positions(int n) {
  std::vector<std::int32_t> p(n);
  for (int i = 0; i < n; ++i) p[i] = i;
  return p;
}

}  // namespace

TEST_CASE("cache_config: defaults are valid and derived sizes follow the fields", "[cache]") {
  dms::cache_config c;
  REQUIRE_NOTHROW(c.validate());
  c = small_config(3, 8, 4);
  c.group_size = 5;
  c.max_row_slots = 10;
  REQUIRE_NOTHROW(c.validate());
  REQUIRE(c.num_query_heads() == 15);
  REQUIRE(c.max_rows() == 4 * 3);
  REQUIRE(c.max_pages_per_row() == 3);  // ceil(10 / 4)

  // The extremes of every range are accepted.
  dms::cache_config lo = small_config(1, 1, 1);
  lo.group_size = 1;
  lo.max_pages = 1;
  lo.max_sequences = 1;
  lo.max_row_slots = 1;
  REQUIRE_NOTHROW(lo.validate());
  dms::cache_config hi =
      small_config(1, dms::cache_config::max_head_dim, dms::cache_config::max_page_size);
  hi.group_size = dms::cache_config::max_group_size;
  REQUIRE_NOTHROW(hi.validate());

  // Each field is checked (the messages are covered in test_errors.cpp).
  for (auto field :
       {&dms::cache_config::num_kv_heads, &dms::cache_config::group_size,
        &dms::cache_config::head_dim, &dms::cache_config::page_size, &dms::cache_config::max_pages,
        &dms::cache_config::max_sequences, &dms::cache_config::max_row_slots}) {
    dms::cache_config bad = small_config(2, 4, 4);
    bad.*field = 0;
    REQUIRE_THROWS_AS(bad.validate(), dms::error);
    REQUIRE_THROWS_AS(dms::paged_cache<float>(bad), dms::error);
  }
}

TEST_CASE("pages are allocated exactly at page boundaries", "[cache]") {
  const int P = GENERATE(1, 4, 16);
  const int H = 3;
  dms::paged_cache<float> cache(small_config(H, 4, P));
  const int s = cache.add_sequence();
  REQUIRE(cache.stats().pages_in_use == 0);

  for (int t = 0; t < 3 * P + 1; ++t) {
    append_token(cache, s, t);
    const int pages_per_row = t / P + 1;  // ceil((t + 1) / P)
    CAPTURE(P, t);
    REQUIRE(cache.stats().pages_in_use == H * pages_per_row);
    for (int h = 0; h < H; ++h) {
      const int r = row_of(cache, s, h);
      REQUIRE(cache.row_length(r) == t + 1);
      REQUIRE(cache.view().num_pages(r) == pages_per_row);
      REQUIRE(cache.positions(r) == iota_positions(t + 1));
    }
  }

  // Every (row, slot) maps to its own storage, and every page belongs to one row only.
  const auto view = cache.view();
  std::set<std::int64_t> slots;
  std::set<int> pages;
  for (int h = 0; h < H; ++h) {
    const int r = row_of(cache, s, h);
    for (int slot = 0; slot < cache.row_length(r); ++slot) slots.insert(view.slot_index(r, slot));
    for (int p = 0; p < view.num_pages(r); ++p) {
      REQUIRE(view.page(r, p) >= 0);
      REQUIRE(view.page(r, p) < cache.config().max_pages);
      pages.insert(view.page(r, p));
    }
    REQUIRE(view.page(r, view.num_pages(r)) == -1);  // past the row's end: no page
  }
  REQUIRE(slots.size() == std::size_t(H) * (3 * P + 1));
  REQUIRE(int(pages.size()) == cache.stats().pages_in_use);
  require_keys_match_positions(cache, s);
}

TEST_CASE("an evicted slot is a hole that the next append refills, last hole first", "[cache]") {
  dms::paged_cache<float> cache(small_config(2, 4, 4));
  const int s = cache.add_sequence();
  for (int t = 0; t < 10; ++t) append_token(cache, s, t);
  const int r0 = row_of(cache, s, 0), r1 = row_of(cache, s, 1);
  const int pages = cache.stats().pages_in_use;

  cache.row(s, 0).evict(2);
  cache.row(s, 0).evict(5);
  REQUIRE(cache.positions(r0) == std::vector<std::int32_t>{0, 1, -1, 3, 4, -1, 6, 7, 8, 9});
  REQUIRE(cache.row_live(r0) == 8);
  REQUIRE(cache.row_length(r0) == 10);  // holes still count towards the span
  REQUIRE(cache.positions(r1) == iota_positions(10));

  append_token(cache, s, 10);  // fills slot 5, the last hole made
  REQUIRE(cache.positions(r0) == std::vector<std::int32_t>{0, 1, -1, 3, 4, 10, 6, 7, 8, 9});
  append_token(cache, s, 11);  // then slot 2
  REQUIRE(cache.positions(r0) == std::vector<std::int32_t>{0, 1, 11, 3, 4, 10, 6, 7, 8, 9});
  REQUIRE(cache.stats().pages_in_use == pages);  // row 1 grew to 12 slots within its 3rd page
  append_token(cache, s, 12);                    // no holes left: the row grows
  REQUIRE(cache.positions(r0) == std::vector<std::int32_t>{0, 1, 11, 3, 4, 10, 6, 7, 8, 9, 12});
  REQUIRE(cache.row_live(r0) == 11);
  REQUIRE(cache.positions(r1) == iota_positions(13));
  REQUIRE(cache.stats().pages_in_use == pages + 1);  // row 1 crossed into a 4th page
  require_keys_match_positions(cache, s);
}

TEST_CASE("compaction moves the highest live slots into the lowest holes and frees trailing pages",
          "[cache]") {
  dms::paged_cache<float> cache(small_config(2, 4, 4));
  const int s = cache.add_sequence();
  for (int t = 0; t < 10; ++t) append_token(cache, s, t);
  const int r0 = row_of(cache, s, 0), r1 = row_of(cache, s, 1);
  REQUIRE(cache.stats().pages_in_use == 6);

  auto row = cache.row(s, 0);
  row.evict(8);
  row.evict(1);
  row.evict(3);
  row.compact();
  // Holes {1, 3, 8}: slot 9 -> 1, slot 8 is a hole, slot 7 -> 3; hole 8 is past the live end.
  REQUIRE(cache.positions(r0) == std::vector<std::int32_t>{0, 9, 2, 7, 4, 5, 6});
  REQUIRE(cache.row_length(r0) == 7);
  REQUIRE(cache.row_live(r0) == 7);
  REQUIRE(cache.view().num_pages(r0) == 2);
  REQUIRE(cache.stats().pages_in_use == 5);  // the third page of row 0 went back to the pool
  REQUIRE(cache.positions(r1) == iota_positions(10));
  require_keys_match_positions(cache, s);  // K/V moved with their positions

  // A dense row is left alone; the next append goes to the end.
  row.compact();
  REQUIRE(cache.positions(r0) == std::vector<std::int32_t>{0, 9, 2, 7, 4, 5, 6});
  append_token(cache, s, 10);
  REQUIRE(cache.positions(r0) == std::vector<std::int32_t>{0, 9, 2, 7, 4, 5, 6, 10});
  require_keys_match_positions(cache, s);

  // Evicting everything and compacting empties the row and returns all its pages.
  for (int slot = 0; slot < 8; ++slot) row.evict(slot);
  row.compact();
  REQUIRE(cache.row_length(r0) == 0);
  REQUIRE(cache.view().num_pages(r0) == 0);
  REQUIRE(cache.stats().pages_in_use == 3);  // row 1 only: 11 slots
  append_token(cache, s, 11);
  REQUIRE(cache.positions(r0) == std::vector<std::int32_t>{11});
  REQUIRE(cache.stats().pages_in_use == 4);
}

TEST_CASE("sequences can be added and removed at any time; ids and pages are reused", "[cache]") {
  auto cfg = small_config(2, 4, 4);
  cfg.max_sequences = 3;
  cfg.max_pages = 12;
  dms::paged_cache<float> cache(cfg);
  REQUIRE(cache.sequences().empty());
  const int a = cache.add_sequence(), b = cache.add_sequence();
  REQUIRE(a == 0);
  REQUIRE(b == 1);
  for (int t = 0; t < 5; ++t) append_token(cache, a, t);  // 2 pages per row
  const int c = cache.add_sequence();                     // added mid-stream
  REQUIRE(c == 2);
  for (int t = 0; t < 9; ++t) append_token(cache, b, t);  // 3 pages per row
  append_token(cache, c, 0);                              // 1 page per row
  REQUIRE(cache.stats().pages_in_use == 2 * (2 + 3 + 1));
  REQUIRE(cache.sequences() == std::vector<int>{0, 1, 2});

  cache.remove_sequence(b);
  REQUIRE_FALSE(cache.contains(b));
  REQUIRE(cache.contains(a));
  REQUIRE(cache.sequences() == std::vector<int>{0, 2});
  REQUIRE(cache.stats().pages_in_use == 2 * (2 + 1));
  REQUIRE(cache.stats().tokens_seen == 2 * (5 + 1));

  // The lowest free id comes back, empty, and its positions restart at 0.
  const int b2 = cache.add_sequence();
  REQUIRE(b2 == 1);
  for (int h = 0; h < 2; ++h) {
    REQUIRE(cache.row_length(row_of(cache, b2, h)) == 0);
    REQUIRE(cache.tokens_seen(row_of(cache, b2, h)) == 0);
  }
  // The pool can be filled completely again with the returned pages: 12 - 6 = 6 pages free.
  for (int t = 0; t < 12; ++t) append_token(cache, b2, t);
  REQUIRE(cache.stats().pages_in_use == 12);
  REQUIRE_THROWS_AS(append_token(cache, b2, 12), dms::error);
  for (int h = 0; h < 2; ++h) REQUIRE(cache.positions(row_of(cache, b2, h)) == iota_positions(12));
  require_keys_match_positions(cache, a);
  require_keys_match_positions(cache, b2);
  require_keys_match_positions(cache, c);

  cache.remove_sequence(a);
  cache.remove_sequence(b2);
  cache.remove_sequence(c);
  REQUIRE(cache.stats().pages_in_use == 0);
  REQUIRE(cache.stats().live_slots == 0);
  REQUIRE(cache.add_sequence() == 0);
}

TEST_CASE("a ragged batch: sequences of different lengths advance independently", "[cache]") {
  const int H = 2;
  dms::paged_cache<float> cache(small_config(H, 4, 4));
  const std::vector<int> lengths{3, 11, 1, 6};
  std::vector<int> ids;
  for (std::size_t i = 0; i < lengths.size(); ++i) ids.push_back(cache.add_sequence());
  // Round-robin decode steps; a sequence that is done drops out of the batch.
  for (int t = 0; t < 11; ++t)
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (t < lengths[i]) decode_token(cache, ids[i], t);

  std::int64_t seen = 0, reads = 0;
  int pages = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    for (int h = 0; h < H; ++h) {
      const int r = row_of(cache, ids[i], h);
      REQUIRE(cache.positions(r) == iota_positions(lengths[i]));
      REQUIRE(cache.tokens_seen(r) == lengths[i]);
    }
    require_keys_match_positions(cache, ids[i]);
    seen += H * lengths[i];
    reads += H * lengths[i] * (lengths[i] + 1) / 2;  // step t reads t + 1 slots per row
    pages += H * ((lengths[i] + 3) / 4);
  }
  const auto st = cache.stats();
  REQUIRE(st.tokens_seen == seen);
  REQUIRE(st.live_slots == seen);
  REQUIRE(st.kv_token_reads == reads);
  REQUIRE(st.pages_in_use == pages);
  REQUIRE(st.compression_ratio == Approx(1.0));
}

TEST_CASE("accounting: tokens seen, live and peak slots, reads and the compression ratio",
          "[cache]") {
  const int H = 2;
  dms::paged_cache<float> cache(small_config(H, 4, 4));
  {
    const auto st = cache.stats();
    REQUIRE(st.tokens_seen == 0);
    REQUIRE(st.live_slots == 0);
    REQUIRE(st.peak_live_slots == 0);
    REQUIRE(st.kv_token_reads == 0);
    REQUIRE(st.pages_in_use == 0);
    REQUIRE(st.compression_ratio == 1.0);
  }
  const int a = cache.add_sequence(), b = cache.add_sequence();
  REQUIRE(cache.stats().compression_ratio == 1.0);  // rows that saw nothing do not count
  for (int t = 0; t < 8; ++t) decode_token(cache, a, t);
  for (int t = 0; t < 4; ++t) decode_token(cache, b, t);
  // Dense decode: step t of a sequence reads t + 1 slots in each of its H rows.
  REQUIRE(cache.stats().kv_token_reads == H * (36 + 10));

  cache.row(a, 0).evict(2);
  cache.row(a, 0).evict(5);
  cache.row(b, 0).evict(0);
  cache.row(b, 0).evict(1);
  cache.row(b, 0).evict(3);
  auto st = cache.stats();
  REQUIRE(st.tokens_seen == 24);
  REQUIRE(st.live_slots == 19);
  REQUIRE(st.peak_live_slots == 24);
  // Rows: a0 6/8, a1 8/8, b0 1/4, b1 4/4  ->  mean 0.75  ->  CR 4/3.
  REQUIRE(st.compression_ratio == Approx(1.0 / ((6.0 / 8 + 1.0 + 1.0 / 4 + 1.0) / 4)));
  REQUIRE(st.compression_ratio == Approx(4.0 / 3.0));

  decode_token(cache, b, 4);  // b0 refills a hole (2 live of 5), b1 grows to 5
  st = cache.stats();
  REQUIRE(st.tokens_seen == 26);
  REQUIRE(st.live_slots == 21);
  REQUIRE(st.peak_live_slots == 24);  // a maximum, not the current value
  REQUIRE(st.kv_token_reads == H * 46 + 2 + 5);
  REQUIRE(st.compression_ratio == Approx(1.0 / ((6.0 / 8 + 1.0 + 2.0 / 5 + 1.0) / 4)));

  cache.remove_sequence(a);  // only live rows count; peak and reads are lifetime totals
  st = cache.stats();
  REQUIRE(st.tokens_seen == 10);
  REQUIRE(st.live_slots == 7);
  REQUIRE(st.peak_live_slots == 24);
  REQUIRE(st.kv_token_reads == H * 46 + 7);
  REQUIRE(st.compression_ratio == Approx(1.0 / ((2.0 / 5 + 1.0) / 2)));
  REQUIRE(cache.row_peak(row_of(cache, b, 0)) == 4);  // before its evictions
  REQUIRE(cache.row_peak(row_of(cache, b, 1)) == 5);

  // The per-row peak is the most the row held at once.
  const int c = cache.add_sequence();
  for (int t = 0; t < 3; ++t) append_token(cache, c, t);
  cache.row(c, 1).evict(0);
  cache.row(c, 1).evict(1);
  append_token(cache, c, 3);
  REQUIRE(cache.row_peak(row_of(cache, c, 0)) == 4);
  REQUIRE(cache.row_peak(row_of(cache, c, 1)) == 3);
}

TEST_CASE("cache_view is a trivially copyable, non-owning view", "[cache][view]") {
  STATIC_REQUIRE(std::is_trivially_copyable_v<dms::cache_view<float>>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<dms::cache_view<dms::half>>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<dms::cache_view<dms::bfloat16>>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<dms::cache_view<const dms::half>>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<dms::cache_view<const dms::bfloat16>>);
  STATIC_REQUIRE(
      std::is_same_v<decltype(std::declval<const dms::cache_view<const float>&>().key(0, 0)),
                     const float*>);
}

TEST_CASE("cache_view::read_only is the same cache, read-only", "[cache][view]") {
  dms::cache_config cfg = small_config(2, 4, 4);
  dms::paged_cache<dms::half, dms::quest_policy> cache(cfg);
  const int seq = cache.add_sequence();
  for (int t = 0; t < 6; ++t) append_token(cache, seq, t);
  const auto w = cache.view();
  const auto r = w.read_only();
  STATIC_REQUIRE(std::is_same_v<decltype(r), const dms::cache_view<const dms::half>>);
  CHECK(r.k == w.k);
  CHECK(r.v == w.v);
  CHECK(r.position == w.position);
  CHECK(r.score == w.score);
  CHECK(r.page_min == w.page_min);
  CHECK(r.page_max == w.page_max);
  CHECK(r.page_table == w.page_table);
  CHECK(r.row_length == w.row_length);
  CHECK(r.num_kv_heads == w.num_kv_heads);
  CHECK(r.group_size == w.group_size);
  CHECK(r.head_dim == w.head_dim);
  CHECK(r.page_size == w.page_size);
  CHECK(r.max_pages_per_row == w.max_pages_per_row);
  CHECK(r.max_rows == w.max_rows);
  CHECK(r.key(1, 5) == w.key(1, 5));
}

TEMPLATE_TEST_CASE("view().key/value point at what append wrote, rounded to the storage type",
                   "[cache][view]", float, dms::half, dms::bfloat16) {
  using T = TestType;
  const int H = 2, d = 5;
  dms::paged_cache<T> cache(small_config(H, d, 4));
  const int s0 = cache.add_sequence(), s1 = cache.add_sequence();
  // Values that are not representable in 16 bits, so the rounding shows. Computed once and kept:
  // the same expression inlined twice may round differently where the compiler contracts a * b + c
  // into a fused multiply-add at one site and not the other (GCC on AArch64 does by default).
  std::vector<float> k_all, v_all;  // [t][s][h][c]
  for (int t = 0; t < 7; ++t)
    for (int s : {s0, s1})
      for (int h = 0; h < H; ++h)
        for (int c = 0; c < d; ++c) {
          k_all.push_back(0.1f * float(t + 1) + 0.013f * float(c) - 0.7f * float(h + s));
          v_all.push_back(1.0f / float(3 + t + c + h + s));
        }
  const auto at = [&](int s, int h, int t, int c) {
    return ((std::size_t(t) * 2 + std::size_t(s == s1)) * H + std::size_t(h)) * d + std::size_t(c);
  };
  const auto k_in = [&](int s, int h, int t, int c) { return k_all[at(s, h, t, c)]; };
  const auto v_in = [&](int s, int h, int t, int c) { return v_all[at(s, h, t, c)]; };
  for (int t = 0; t < 7; ++t)
    for (int s : {s0, s1}) {
      const std::size_t first = at(s, 0, t, 0), n = std::size_t(H) * d;
      cache.append(s, std::span<const float>(k_all.data() + first, n),
                   std::span<const float>(v_all.data() + first, n));
    }

  const dms::cache_view<T> view = cache.view();
  const auto& const_cache = cache;
  const auto const_view = const_cache.view();
  STATIC_REQUIRE(std::is_same_v<decltype(const_view), const dms::cache_view<const T>>);
  STATIC_REQUIRE(std::is_same_v<decltype(const_view.key(0, 0)), const T*>);
  STATIC_REQUIRE(std::is_same_v<decltype(view.key(0, 0)), T*>);

  dms::cache_view<T> copy;  // a bytewise copy is as good as the original
  std::memcpy(static_cast<void*>(&copy), &view, sizeof view);

  for (int s : {s0, s1})
    for (int h = 0; h < H; ++h) {
      const int r = cache.row_index(s, h);
      REQUIRE(view.length(r) == 7);
      REQUIRE(view.num_pages(r) == 2);
      for (int t = 0; t < 7; ++t) {
        REQUIRE(view.position[view.slot_index(r, t)] == t);
        REQUIRE(const_view.key(r, t) == view.key(r, t));
        REQUIRE(const_view.value(r, t) == view.value(r, t));
        REQUIRE(copy.key(r, t) == view.key(r, t));
        for (int c = 0; c < d; ++c) {
          const T k = view.key(r, t)[c], v = view.value(r, t)[c];
          REQUIRE(k == dms::from_float<T>(k_in(s, h, t, c)));
          REQUIRE(v == dms::from_float<T>(v_in(s, h, t, c)));
          if constexpr (std::is_same_v<T, float>) {
            REQUIRE(k == k_in(s, h, t, c));  // fp32 storage is exact
            REQUIRE(v == v_in(s, h, t, c));
          }
        }
      }
    }
  // No per-slot scores or page bounds for the dense policy.
  REQUIRE(view.score == nullptr);
  REQUIRE(view.page_min == nullptr);
  REQUIRE(view.page_max == nullptr);
  REQUIRE(view.num_kv_heads == H);
  REQUIRE(view.head_dim == d);
  REQUIRE(view.page_size == 4);
  REQUIRE(view.max_rows == cache.config().max_rows());
  REQUIRE(view.max_pages_per_row == cache.config().max_pages_per_row());
}

TEMPLATE_TEST_CASE("append accepts 16-bit inputs and converts them through fp32", "[cache][view]",
                   float, dms::half, dms::bfloat16) {
  using T = TestType;
  const int H = 1, d = 4;
  dms::paged_cache<T> cache(small_config(H, d, 4));
  const int s = cache.add_sequence();
  std::vector<dms::half> k{dms::half(0.5f), dms::half(-1.25f), dms::half(3.0f), dms::half(0.1f)};
  std::vector<dms::half> v{dms::half(2.0f), dms::half(0.0f), dms::half(-0.75f), dms::half(1e-3f)};
  cache.append(s, k, v);
  const auto view = cache.view();
  for (int c = 0; c < d; ++c) {
    REQUIRE(view.key(0, 0)[c] == dms::from_float<T>(dms::to_float(k[c])));
    REQUIRE(view.value(0, 0)[c] == dms::from_float<T>(dms::to_float(v[c])));
  }
}
