// SPDX-License-Identifier: Apache-2.0
// The batched step algorithm that the CUDA bookkeeping kernels run (dms/step/batch_step.hpp),
// executed serially on a cache_image, against paged_cache doing the same decode steps one sequence
// at a time. Equality is exact and total: slots, positions, holes, page ids, the free stack, rings,
// scores, key bounds and K/V bits. The GPU tests then only need to show the kernels equal this.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "dms/dms.hpp"
#include "support/image_compare.hpp"
#include "support/step_config.hpp"

namespace {

using dms_test::step_config;

// Runs `steps` decode steps over a shuffled batch of sequences on both paths and compares the
// full images after every step. Sequences start with different numbers of tokens (ragged), one
// sequence is removed and a new one added half way (id and page reuse).
template <class T, class P>
void check_equivalence(const dms::cache_config& cfg, P policy, int steps, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> logit(-1.0f, 1.0f);
  const int H = cfg.num_kv_heads, d = cfg.head_dim;

  dms::paged_cache<T, P> host(cfg, policy);
  const auto dp = host.policy().device_form();
  std::vector<std::int32_t> seqs;
  for (int s = 0; s < 4; ++s) seqs.push_back(host.add_sequence());
  dms::cache_image<T> img = host.to_image();

  for (int step = 0; step < steps; ++step) {
    if (step == steps / 2) {  // remove one sequence, add another: ids and pages are reused
      const int gone = seqs[1];
      host.remove_sequence(gone);
      dms::step::release_sequence(img.state(), gone);
      seqs.erase(seqs.begin() + 1);
      const int added = host.add_sequence();
      img.active[added] = 1;
      seqs.push_back(added);
      REQUIRE(dms_test::first_difference(host.to_image(), img) == "");
    }
    // Ragged: sequence i skips the first i steps. The batch order is shuffled every step.
    std::vector<std::int32_t> batch;
    for (std::size_t i = 0; i < seqs.size(); ++i)
      if (step >= int(i)) batch.push_back(seqs[i]);
    std::shuffle(batch.begin(), batch.end(), rng);
    const int B = int(batch.size());
    std::vector<float> k(std::size_t(B) * H * d), v(k.size()), logits(std::size_t(B) * H);
    for (auto& x : k) x = normal(rng);
    for (auto& x : v) x = normal(rng);
    for (auto& x : logits) x = logit(rng);

    for (int b = 0; b < B; ++b) {
      const auto at = std::size_t(b) * H * d;
      host.append(batch[b], std::span<const float>(k).subspan(at, std::size_t(H) * d),
                  std::span<const float>(v).subspan(at, std::size_t(H) * d),
                  std::span<const float>(logits).subspan(std::size_t(b) * H, std::size_t(H)));
    }
    REQUIRE(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(batch), k.data(),
                                    v.data(), logits.data(), false) == dms::step_status::ok);
    REQUIRE(dms_test::first_difference(host.to_image(), img) == "");

    // Attention folds scores on the host; the image takes them over (its pages are the same).
    std::vector<float> q(std::size_t(cfg.num_query_heads()) * d), out(q.size());
    for (const int seq : batch) {
      for (auto& x : q) x = normal(rng);
      dms::reference::decode_attention(host, seq, q, out);
    }
    if (!img.score.empty()) img.score = host.to_image().score;
    for (const int seq : batch) host.finish_step(seq);
    dms::step::evict_batch(img.state(), dp, std::span<const std::int32_t>(batch));
    REQUIRE(dms_test::first_difference(host.to_image(), img) == "");
  }
  // And back: loading the image into a fresh host cache reproduces the cache.
  dms::paged_cache<T, P> copy(cfg, policy);
  copy.load_image(img);
  REQUIRE(dms_test::first_difference(copy.to_image(), img) == "");
  for (const int seq : seqs)
    for (int h = 0; h < H; ++h) {
      const int r = host.row_index(seq, h);
      CHECK(copy.positions(r) == host.positions(r));
      CHECK(copy.row_live(r) == host.row_live(r));
    }
}

}  // namespace

TEST_CASE("batched step == paged_cache: dense", "[step]") {
  check_equivalence<dms::bfloat16>(step_config(2, 2, 8, 4, 128), dms::dense_policy{}, 40, 1);
}

TEST_CASE("batched step == paged_cache: DMS, windows 0, 1, 3 and 16", "[step][dms]") {
  for (const int w : {0, 1, 3, 16}) {
    INFO("window " << w);
    check_equivalence<dms::half>(step_config(3, 2, 8, 4, 256), dms::dms_policy(dms::dms_params{w}),
                                 60, unsigned(10 + w));
  }
}

TEST_CASE("batched step == paged_cache: TOVA and H2O evict the same slots", "[step][tova][h2o]") {
  check_equivalence<float>(step_config(2, 4, 8, 4, 256), dms::tova_policy(dms::tova_params{7}), 50,
                           3);
  check_equivalence<dms::bfloat16>(step_config(2, 2, 8, 4, 256),
                                   dms::h2o_policy(dms::h2o_params{9, 4}), 50, 4);
}

TEST_CASE("batched step == paged_cache: StreamingLLM, Quest, SnapKV", "[step]") {
  check_equivalence<dms::half>(step_config(2, 2, 8, 4, 256),
                               dms::streaming_llm_policy(dms::streaming_params{2, 5}), 50, 5);
  check_equivalence<float>(step_config(2, 2, 8, 4, 256),
                           dms::quest_policy(dms::quest_params{8, 2, 2}), 40, 6);
  check_equivalence<float>(step_config(1, 2, 8, 4, 128), dms::snapkv_policy{}, 30, 7);
}

TEST_CASE("batched step: a step that cannot complete changes nothing, and the status sticks",
          "[step][errors]") {
  // 2 KV heads, pages of 2 slots, 5 pages: three sequences need 6 pages for their first token.
  const auto cfg = step_config(2, 1, 4, 2, 5);
  dms::paged_cache<float, dms::dense_policy> host(cfg);
  for (int s = 0; s < 3; ++s) host.add_sequence();
  auto img = host.to_image();
  const auto dp = dms::dense_policy{}.device_form();
  std::vector<float> kv(3 * 2 * 4, 1.0f);
  const std::vector<std::int32_t> three{0, 1, 2}, two{0, 1}, dup{1, 1}, bad{0, 5};

  const auto before = img;
  CHECK(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(three), kv.data(),
                                kv.data(), nullptr, false) == dms::step_status::pool_exhausted);
  CHECK(img.status == int(dms::step_status::pool_exhausted));
  img.status = 0;
  CHECK(dms_test::first_difference(before, img) == "");
  img.status = int(dms::step_status::pool_exhausted);

  // Sticky: a step that would fit is skipped too, until the status is cleared.
  CHECK(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(two), kv.data(),
                                kv.data(), nullptr, false) == dms::step_status::pool_exhausted);
  img.status = 0;
  CHECK(dms_test::first_difference(before, img) == "");
  CHECK(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(two), kv.data(),
                                kv.data(), nullptr, false) == dms::step_status::ok);
  CHECK(img.free_top == 1);

  auto snapshot = img;
  CHECK(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(dup), kv.data(),
                                kv.data(), nullptr, false) == dms::step_status::duplicate_sequence);
  img.status = 0;
  CHECK(dms_test::first_difference(snapshot, img) == "");
  CHECK(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(bad), kv.data(),
                                kv.data(), nullptr, false) == dms::step_status::bad_sequence);
  img.status = 0;
  CHECK(dms_test::first_difference(snapshot, img) == "");

  // A full row: max_row_slots = 1.
  auto one_slot = cfg;
  one_slot.max_row_slots = 1;
  dms::paged_cache<float, dms::dense_policy> small(one_slot);
  small.add_sequence();
  auto simg = small.to_image();
  const std::vector<std::int32_t> first{0};
  CHECK(dms::step::append_batch(simg.state(), dp, std::span<const std::int32_t>(first), kv.data(),
                                kv.data(), nullptr, false) == dms::step_status::ok);
  CHECK(dms::step::append_batch(simg.state(), dp, std::span<const std::int32_t>(first), kv.data(),
                                kv.data(), nullptr, false) == dms::step_status::row_full);
}

TEST_CASE("cache images: holes are threaded through positions and round-trip", "[step]") {
  const auto cfg = step_config(1, 1, 4, 4, 16);
  dms::paged_cache<float, dms::dense_policy> host(cfg);
  const int seq = host.add_sequence();
  std::vector<float> kv(4, 0.5f);
  for (int t = 0; t < 10; ++t) host.append(seq, kv, kv);
  auto row = host.row(seq, 0);
  row.evict(2);
  row.evict(7);
  row.evict(5);  // hole stack, bottom first: 2, 7, 5

  auto img = host.to_image();
  CHECK(img.hole_head[0] == 5);
  CHECK(img.positions(0) == host.positions(0));
  auto st = img.state();
  CHECK(st.pop_hole(0) == 5);
  CHECK(st.pop_hole(0) == 7);
  CHECK(st.pop_hole(0) == 2);
  CHECK(img.hole_head[0] == -1);

  dms::paged_cache<float, dms::dense_policy> copy(cfg);
  copy.load_image(host.to_image());
  copy.append(seq, kv, kv);  // refills the most recent hole, as the original would
  host.append(seq, kv, kv);
  CHECK(copy.positions(0) == host.positions(0));
  CHECK(host.positions(0)[5] == 10);

  auto other = cfg;
  other.head_dim = 8;
  dms::paged_cache<float, dms::dense_policy> wrong(other);
  CHECK_THROWS_WITH(wrong.load_image(img), Catch::Contains("cache_config differs"));
}

TEST_CASE("batched step: of duplicate ids the first entry counts, whatever order they are noted in",
          "[step][errors]") {
  // 2 KV heads, 6 sequence slots of which 0..3 are active; 4 is inactive, -1, 6 and 9 are out of
  // range. Pages are plentiful, so the only errors are bad and duplicate ids.
  const auto cfg = step_config(2, 1, 4, 4, 256);
  dms::paged_cache<float, dms::dense_policy> host(cfg);
  for (int s = 0; s < 4; ++s) host.add_sequence();
  const auto dp = dms::dense_policy{}.device_form();
  const std::vector<std::int32_t> pool{0, 1, 2, 3, 0, 1, 4, -1, 6, 9};
  std::mt19937 rng(31);
  std::vector<float> kv(64 * 2 * 4, 0.25f);

  for (int trial = 0; trial < 400; ++trial) {
    const int B = 1 + int(rng() % 12);
    std::vector<std::int32_t> batch(static_cast<std::size_t>(B));
    for (auto& s : batch) s = pool[rng() % pool.size()];
    INFO("trial " << trial << ", batch of " << B);

    // The definition: entry b is bad if its id is not active, a duplicate if an earlier entry
    // holds the same (active) id; the step fails with the first such entry's error.
    std::vector<dms::step_status> expect_entry(static_cast<std::size_t>(B), dms::step_status::ok);
    dms::step_status expect = dms::step_status::ok;
    for (int b = 0; b < B; ++b) {
      const bool valid = batch[b] >= 0 && batch[b] < 4;
      bool repeat = false;
      for (int e = 0; e < b; ++e) repeat = repeat || batch[e] == batch[b];
      expect_entry[b] = !valid   ? dms::step_status::bad_sequence
                        : repeat ? dms::step_status::duplicate_sequence
                                 : dms::step_status::ok;
      if (expect == dms::step_status::ok) expect = expect_entry[b];
    }

    // The shared helpers, with the first entries noted in a random order (as the kernel's
    // atomicMin may land them) give exactly those verdicts.
    auto img = host.to_image();
    const auto st = img.state();
    std::vector<int> order(static_cast<std::size_t>(B));
    for (int b = 0; b < B; ++b) order[b] = b;
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<std::int32_t> first(static_cast<std::size_t>(cfg.max_sequences),
                                    dms::step::no_entry);
    for (const int b : order)
      dms::step::note_entry(first.data(), st.active, cfg.max_sequences, batch[b], b);
    for (int i = 0; i < B * cfg.num_kv_heads; ++i) {
      const int b = i / cfg.num_kv_heads, h = i % cfg.num_kv_heads;
      auto plan = dms::step::plan_append(st, dp, batch[b], h, 0.0f, false);
      dms::step::flag_duplicate(plan, first.data(), batch[b], b, h);
      CHECK(plan.error == (h == 0 ? expect_entry[b]
                           : expect_entry[b] == dms::step_status::bad_sequence
                               ? dms::step_status::bad_sequence
                               : dms::step_status::ok));
    }

    // The serial driver records the first entry's error and changes nothing else.
    const auto before = img;
    CHECK(dms::step::append_batch(st, dp, std::span<const std::int32_t>(batch), kv.data(),
                                  kv.data(), nullptr, false) == expect);
    if (expect != dms::step_status::ok) {
      CHECK(img.status == int(expect));
      img.status = 0;
      CHECK(dms_test::first_difference(before, img) == "");
    }
  }
}
