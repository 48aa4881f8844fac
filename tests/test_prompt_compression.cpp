// SPDX-License-Identifier: Apache-2.0
// Prompt compression as the device runs it (dms/step/prompt_compression.hpp), executed serially on
// a cache_image, against paged_cache::finish_prompt (the host policies' compress_prompt) for the
// same sequences in the same order. Equality is exact and total (dms_test::first_difference):
// slots, positions, scores, K/V bits, page ids, the free stack, holes and rings. Scores are
// written directly, with many ties (and -0.0f), so the tie rule (older token first) decides.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "dms/dms.hpp"
#include "support/image_compare.hpp"
#include "support/step_config.hpp"

namespace {

using dms_test::step_config;

enum class score_kind { random, ties, zeros };

std::vector<float> normal_vector(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  for (auto& e : x) e = normal(rng);
  return x;
}

template <class T>
using span_of = std::span<const T>;

// Writes a score into every live slot of every row of `seqs` (nothing if the policy keeps none).
template <class T, class P>
void write_scores(dms::paged_cache<T, P>& host, std::span<const std::int32_t> seqs, score_kind kind,
                  std::mt19937& rng) {
  auto view = host.view();
  if (!view.score) return;
  static constexpr float tie_values[] = {0.0f, -0.0f, 0.25f, 0.5f, 0.25f, 0.0f};
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 5), sign(0, 1);
  for (const std::int32_t seq : seqs)
    for (int h = 0; h < host.config().num_kv_heads; ++h) {
      const int r = host.row_index(seq, h);
      for (int s = 0; s < host.row_length(r); ++s) {
        const std::int64_t at = view.slot_index(r, s);
        if (view.position[at] < 0) continue;
        float x = 0.0f;
        switch (kind) {
          case score_kind::random:
            x = uniform(rng);
            break;
          case score_kind::ties:
            x = tie_values[pick(rng)];
            break;
          case score_kind::zeros:
            x = sign(rng) != 0 ? -0.0f : 0.0f;
            break;
        }
        view.score[at] = x;
      }
    }
}

// Appends lengths[i] prompt tokens to seqs[i] on the host, round-robin in a shuffled order per
// round, so the rows' pages interleave in the pool.
template <class T, class P>
void append_prompts(dms::paged_cache<T, P>& host, const std::vector<std::int32_t>& seqs,
                    const std::vector<int>& lengths, std::mt19937& rng) {
  const auto n = static_cast<std::size_t>(host.config().num_kv_heads) * host.config().head_dim;
  std::vector<int> done(seqs.size(), 0);
  std::vector<std::size_t> order(seqs.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  for (bool more = true; more;) {
    more = false;
    std::shuffle(order.begin(), order.end(), rng);
    for (const std::size_t i : order) {
      if (done[i] >= lengths[i]) continue;
      const auto k = normal_vector(rng, n), v = normal_vector(rng, n);
      host.append(seqs[i], k, v, {}, /*in_prompt=*/true);
      ++done[i];
      more = true;
    }
  }
}

// Ends the prompts of `batch` on both paths (image: finish_prompts; host: finish_prompt per
// sequence, in batch order) from the host's current state, and compares. Returns the image.
template <class T, class P>
dms::cache_image<T> finish_both(dms::paged_cache<T, P>& host,
                                const std::vector<std::int32_t>& batch) {
  auto img = host.to_image();
  const auto dp = host.policy().device_form();
  REQUIRE(dms::step::finish_prompts(img.state(), dp, std::span<const std::int32_t>(batch)) ==
          dms::step_status::ok);
  CHECK(img.status == 0);
  for (const std::int32_t seq : batch) host.finish_prompt(seq);
  REQUIRE(dms_test::first_difference(host.to_image(), img) == "");
  return img;
}

// Decode steps on both paths (append_batch vs host.append; scores written on the host and taken
// over by the image; evict_batch vs finish_step), comparing after each phase.
template <class T, class P>
void decode_both(dms::paged_cache<T, P>& host, dms::cache_image<T>& img,
                 std::vector<std::int32_t> seqs, int steps, std::mt19937& rng) {
  const auto dp = host.policy().device_form();
  const int H = host.config().num_kv_heads, d = host.config().head_dim;
  const auto per = static_cast<std::size_t>(H) * d;
  for (int step = 0; step < steps; ++step) {
    std::shuffle(seqs.begin(), seqs.end(), rng);
    const auto k = normal_vector(rng, seqs.size() * per), v = normal_vector(rng, seqs.size() * per);
    for (std::size_t b = 0; b < seqs.size(); ++b)
      host.append(seqs[b], span_of<float>(k).subspan(b * per, per),
                  span_of<float>(v).subspan(b * per, per));
    REQUIRE(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(seqs), k.data(),
                                    v.data(), nullptr, false) == dms::step_status::ok);
    REQUIRE(dms_test::first_difference(host.to_image(), img) == "");
    write_scores(host, std::span<const std::int32_t>(seqs), score_kind::ties, rng);
    if (!img.score.empty()) img.score = host.to_image().score;
    for (const std::int32_t seq : seqs) host.finish_step(seq);
    dms::step::evict_batch(img.state(), dp, std::span<const std::int32_t>(seqs));
    REQUIRE(dms_test::first_difference(host.to_image(), img) == "");
  }
}

// One prompt per sequence (lengths), scores of the given kind, finished in a shuffled batch
// order on both paths; every row must end with expected_live(length) tokens. Then decode.
template <class T, class P, class ExpectedLive>
void check_prompts(const dms::cache_config& cfg, const P& policy, const std::vector<int>& lengths,
                   score_kind kind, unsigned seed, ExpectedLive expected_live) {
  std::mt19937 rng(seed);
  dms::paged_cache<T, P> host(cfg, policy);
  std::vector<std::int32_t> seqs;
  for (std::size_t i = 0; i < lengths.size(); ++i) seqs.push_back(host.add_sequence());
  append_prompts(host, seqs, lengths, rng);
  write_scores(host, std::span<const std::int32_t>(seqs), kind, rng);
  const int pages_before = host.stats().pages_in_use;

  auto batch = seqs;
  std::shuffle(batch.begin(), batch.end(), rng);
  auto img = finish_both(host, batch);

  int expected_pages = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i)
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      const int r = host.row_index(seqs[i], h);
      INFO("sequence " << seqs[i] << " of " << lengths[i] << " tokens, kv head " << h);
      CHECK(host.row_live(r) == expected_live(lengths[i]));
      CHECK(host.row_length(r) == host.row_live(r));
      CHECK(host.tokens_seen(r) == lengths[i]);
      expected_pages += (expected_live(lengths[i]) + cfg.page_size - 1) / cfg.page_size;
    }
  CHECK(host.stats().pages_in_use == expected_pages);
  CHECK(img.free_top == cfg.max_pages - expected_pages);
  CHECK(pages_before >= expected_pages);

  decode_both(host, img, seqs, 6, rng);
}

template <class T, class P, class ExpectedLive>
void check_prompts_all_scores(const dms::cache_config& cfg, const P& policy,
                              const std::vector<int>& lengths, unsigned seed,
                              ExpectedLive expected_live) {
  for (const score_kind kind : {score_kind::random, score_kind::ties, score_kind::zeros}) {
    INFO("score kind " << int(kind));
    check_prompts<T>(cfg, policy, lengths, kind, seed + unsigned(kind), expected_live);
  }
}

// Two turns: prompt, decode (holes from evictions), a few manual evictions (more holes), a second
// prompt appended on both paths (refilling some holes, not all), finish, decode again.
template <class T, class P>
void check_multi_turn(const dms::cache_config& cfg, const P& policy,
                      const std::vector<int>& first_turn, const std::vector<int>& second_turn,
                      int manual_evictions, unsigned seed) {
  std::mt19937 rng(seed);
  dms::paged_cache<T, P> host(cfg, policy);
  const auto dp = host.policy().device_form();
  const int H = cfg.num_kv_heads, d = cfg.head_dim;
  const auto per = static_cast<std::size_t>(H) * d;
  std::vector<std::int32_t> seqs;
  for (std::size_t i = 0; i < first_turn.size(); ++i) seqs.push_back(host.add_sequence());
  append_prompts(host, seqs, first_turn, rng);
  write_scores(host, std::span<const std::int32_t>(seqs), score_kind::ties, rng);
  auto batch = seqs;
  std::shuffle(batch.begin(), batch.end(), rng);
  auto img = finish_both(host, batch);
  decode_both(host, img, seqs, 5, rng);

  // More holes, made on the host; the image follows by conversion.
  if (manual_evictions > 0) {
    for (const std::int32_t seq : seqs)
      for (int h = 0; h < H; ++h) {
        auto row = host.row(seq, h);
        for (int e = 0; e < manual_evictions; ++e) {
          std::vector<int> live;
          for (int s = 0; s < row.length(); ++s)
            if (row.position(s) >= 0) live.push_back(s);
          if (live.size() <= 1) break;
          row.evict(live[std::uniform_int_distribution<std::size_t>(0, live.size() - 1)(rng)]);
        }
      }
    img = host.to_image();
  }

  // Second prompt: both paths append, in_prompt, one token per sequence per round.
  std::vector<int> done(seqs.size(), 0);
  for (bool more = true; more;) {
    std::vector<std::int32_t> round;
    for (std::size_t i = 0; i < seqs.size(); ++i)
      if (done[i] < second_turn[i]) {
        round.push_back(seqs[i]);
        ++done[i];
      }
    more = !round.empty();
    if (!more) break;
    std::shuffle(round.begin(), round.end(), rng);
    const auto k = normal_vector(rng, round.size() * per),
               v = normal_vector(rng, round.size() * per);
    for (std::size_t b = 0; b < round.size(); ++b)
      host.append(round[b], span_of<float>(k).subspan(b * per, per),
                  span_of<float>(v).subspan(b * per, per), {}, /*in_prompt=*/true);
    REQUIRE(dms::step::append_batch(img.state(), dp, std::span<const std::int32_t>(round), k.data(),
                                    v.data(), nullptr, true) == dms::step_status::ok);
  }
  REQUIRE(dms_test::first_difference(host.to_image(), img) == "");

  write_scores(host, std::span<const std::int32_t>(seqs), score_kind::ties, rng);
  const auto before = host.to_image();
  int rows_with_holes = 0;
  for (int r = 0; r < cfg.max_rows(); ++r) rows_with_holes += before.hole_head[r] >= 0 ? 1 : 0;
  if (manual_evictions > 0) CHECK(rows_with_holes > 0);

  std::shuffle(batch.begin(), batch.end(), rng);
  img = finish_both(host, batch);
  decode_both(host, img, seqs, 6, rng);
}

// A batch of prompts through the reference prefill, chunk by chunk (sequences in batch order
// within a chunk), with the prompt's end deferred; then finished on both paths. Real attention
// scores. A second cache that prefills each sequence alone (finishing as it goes) must keep the
// same positions per row.
template <class T, class P>
void check_prefill(const dms::cache_config& cfg, const P& policy, const std::vector<int>& lengths,
                   int chunk, unsigned seed) {
  std::mt19937 rng(seed);
  dms::paged_cache<T, P> host(cfg, policy), alone(cfg, policy);
  const auto qrow = static_cast<std::size_t>(cfg.num_query_heads()) * cfg.head_dim;
  const auto krow = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  std::vector<std::int32_t> seqs;
  std::vector<std::vector<float>> q, k, v;
  for (const int len : lengths) {
    seqs.push_back(host.add_sequence());
    REQUIRE(alone.add_sequence() == seqs.back());
    q.push_back(normal_vector(rng, static_cast<std::size_t>(len) * qrow));
    k.push_back(normal_vector(rng, static_cast<std::size_t>(len) * krow));
    v.push_back(normal_vector(rng, static_cast<std::size_t>(len) * krow));
  }
  std::vector<std::size_t> order(seqs.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  const int longest = *std::max_element(lengths.begin(), lengths.end());
  std::vector<float> out;
  for (int begin = 0; begin < longest; begin += chunk) {
    for (const std::size_t i : order) {
      if (begin >= lengths[i]) continue;
      const int len = std::min(chunk, lengths[i] - begin);
      const auto b = static_cast<std::size_t>(begin), n = static_cast<std::size_t>(len);
      out.assign(n * qrow, 0.0f);
      dms::reference::prefill_chunk_inputs in{span_of<float>(q[i]).subspan(b * qrow, n * qrow),
                                              span_of<float>(k[i]).subspan(b * krow, n * krow),
                                              span_of<float>(v[i]).subspan(b * krow, n * krow)};
      dms::reference::prefill_chunk(host, seqs[i], in, lengths[i], {std::span<float>(out)},
                                    dms::reference::end_of_prompt::defer);
    }
  }
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    if (lengths[i] == 0) continue;
    out.assign(static_cast<std::size_t>(lengths[i]) * qrow, 0.0f);
    dms::reference::prefill(alone, seqs[i], {q[i], k[i], v[i]}, chunk, {std::span<float>(out)});
  }

  std::vector<std::int32_t> batch;
  for (const std::size_t i : order) batch.push_back(seqs[i]);
  auto img = finish_both(host, batch);
  for (const std::int32_t seq : seqs)
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      const int r = host.row_index(seq, h);
      INFO("sequence " << seq << ", kv head " << h);
      CHECK(host.positions(r) == alone.positions(r));
      CHECK(host.row_live(r) == alone.row_live(r));
    }
  decode_both(host, img, seqs, 4, rng);
}

}  // namespace

TEST_CASE("prompt compression == finish_prompt: TOVA", "[step][prompt][tova]") {
  const int budget = 6;
  const auto live = [&](int len) { return std::min(len, budget); };
  const std::vector<int> lengths{0, 1, 4, 8, 13, 16};
  check_prompts_all_scores<float>(step_config(2, 2, 4, 4, 256),
                                  dms::tova_policy(dms::tova_params{6}), lengths, 100, live);
  check_prompts_all_scores<dms::bfloat16>(
      step_config(2, 2, 4, 4, 256), dms::tova_policy(dms::tova_params{6}), lengths, 110, live);
  // Pages of 16: prompts of 0, 5 (under budget), 16, 32, 37 tokens, budget 20.
  check_prompts_all_scores<dms::bfloat16>(
      step_config(1, 2, 4, 16, 128), dms::tova_policy(dms::tova_params{20}), {0, 5, 16, 32, 37},
      120, [](int len) { return std::min(len, 20); });
}

TEST_CASE("prompt compression == finish_prompt: H2O", "[step][prompt][h2o]") {
  const std::vector<int> lengths{0, 1, 7, 8, 12, 19};
  check_prompts_all_scores<float>(step_config(2, 2, 4, 4, 256),
                                  dms::h2o_policy(dms::h2o_params{7, 3}), lengths, 200,
                                  [](int len) { return std::min(len, 7); });
  check_prompts_all_scores<dms::bfloat16>(step_config(3, 1, 4, 4, 256),
                                          dms::h2o_policy(dms::h2o_params{5, 0}), lengths, 210,
                                          [](int len) { return std::min(len, 5); });
  // budget == recent: only the newest survive.
  check_prompts_all_scores<float>(step_config(1, 2, 4, 4, 256),
                                  dms::h2o_policy(dms::h2o_params{4, 4}), lengths, 220,
                                  [](int len) { return std::min(len, 4); });
  check_prompts_all_scores<dms::bfloat16>(step_config(2, 2, 4, 16, 128),
                                          dms::h2o_policy(dms::h2o_params{18, 5}), {0, 16, 33, 48},
                                          230, [](int len) { return std::min(len, 18); });
}

TEST_CASE("prompt compression == finish_prompt: SnapKV, max and avg pooling",
          "[step][prompt][snapkv]") {
  const std::vector<int> lengths{0, 1, 8, 9, 16, 23};
  const auto live = [](int capacity) {
    return [capacity](int len) { return len <= capacity ? len : capacity; };
  };
  struct variant {
    int capacity, window, kernel;
    dms::snapkv_pooling pooling;
  };
  unsigned seed = 300;
  for (const variant x :
       {variant{8, 3, 7, dms::snapkv_pooling::max}, variant{8, 3, 5, dms::snapkv_pooling::avg},
        variant{8, 2, 1, dms::snapkv_pooling::max}, variant{8, 2, 1, dms::snapkv_pooling::avg},
        variant{8, 1, 7, dms::snapkv_pooling::avg}, variant{4, 4, 3, dms::snapkv_pooling::max}}) {
    INFO("capacity " << x.capacity << ", window " << x.window << ", kernel " << x.kernel
                     << (x.pooling == dms::snapkv_pooling::max ? ", max" : ", avg"));
    const dms::snapkv_policy policy(dms::snapkv_params{x.capacity, x.window, x.kernel, x.pooling});
    check_prompts_all_scores<float>(step_config(2, 2, 4, 4, 256), policy, lengths, seed,
                                    live(x.capacity));
    check_prompts_all_scores<dms::bfloat16>(step_config(2, 1, 4, 4, 256), policy, lengths,
                                            seed + 10, live(x.capacity));
    seed += 20;
  }
  const dms::snapkv_policy wide(dms::snapkv_params{20, 4, 7, dms::snapkv_pooling::avg});
  check_prompts_all_scores<float>(step_config(1, 2, 4, 16, 128), wide, {0, 16, 20, 33, 48}, 400,
                                  live(20));
}

TEST_CASE("prompt compression == finish_prompt: StreamingLLM", "[step][prompt][streaming]") {
  const std::vector<int> lengths{0, 1, 3, 4, 7, 8, 21};
  struct variant {
    int sinks, recent;
  };
  unsigned seed = 500;
  for (const variant x : {variant{0, 3}, variant{4, 3}, variant{2, 5}, variant{1, 1}}) {
    INFO("sinks " << x.sinks << ", recent " << x.recent);
    const dms::streaming_llm_policy policy(dms::streaming_params{x.sinks, x.recent});
    const auto live = [x](int len) { return std::min(len, x.sinks + x.recent); };
    check_prompts<float>(step_config(2, 2, 4, 4, 256), policy,
                         std::vector<int>(lengths.begin(), lengths.begin() + 4), score_kind::random,
                         seed, live);
    check_prompts<dms::bfloat16>(step_config(2, 1, 4, 4, 256), policy,
                                 std::vector<int>(lengths.begin() + 3, lengths.end()),
                                 score_kind::random, seed + 1, live);
    seed += 10;
  }
  check_prompts<float>(step_config(1, 1, 4, 16, 128),
                       dms::streaming_llm_policy(dms::streaming_params{4, 12}), {0, 16, 17, 40},
                       score_kind::random, 550, [](int len) { return std::min(len, 16); });
}

TEST_CASE("prompt compression == finish_prompt: a second prompt over rows with holes",
          "[step][prompt]") {
  // Second-turn counts: none, fewer than the holes, more than the holes.
  check_multi_turn<float>(step_config(2, 2, 4, 4, 256), dms::tova_policy(dms::tova_params{6}),
                          {3, 9, 14, 8}, {0, 1, 6, 12}, 3, 600);
  check_multi_turn<dms::bfloat16>(step_config(2, 2, 4, 4, 256),
                                  dms::h2o_policy(dms::h2o_params{7, 2}), {5, 10, 15, 8},
                                  {2, 0, 1, 9}, 3, 610);
  check_multi_turn<float>(step_config(2, 1, 4, 4, 256), dms::h2o_policy(dms::h2o_params{5, 0}),
                          {1, 10, 6}, {1, 3, 9}, 2, 620);
  // SnapKV: rows within capacity keep their holes (left untouched), the others compress.
  check_multi_turn<dms::bfloat16>(
      step_config(2, 2, 4, 4, 256),
      dms::snapkv_policy(dms::snapkv_params{12, 3, 5, dms::snapkv_pooling::max}), {4, 10, 15, 2},
      {1, 3, 9, 0}, 3, 630);
  check_multi_turn<float>(step_config(1, 2, 4, 4, 256),
                          dms::snapkv_policy(dms::snapkv_params{9, 2, 3, dms::snapkv_pooling::avg}),
                          {6, 12, 3}, {2, 4, 1}, 2, 640);
  // StreamingLLM: the ring after the second compaction must match (decode then follows it).
  for (const int sinks : {0, 2, 4}) {
    INFO("sinks " << sinks);
    check_multi_turn<dms::bfloat16>(step_config(2, 2, 4, 4, 256),
                                    dms::streaming_llm_policy(dms::streaming_params{sinks, 5}),
                                    {3, 11, 17, 6}, {0, 4, 9, 13}, 0, unsigned(650 + sinks));
  }
}

TEST_CASE("prompt compression == finish_prompt: after a deferred, batched reference prefill",
          "[step][prompt]") {
  const std::vector<int> lengths{0, 5, 12, 16, 23};
  check_prefill<float>(step_config(2, 2, 8, 4, 512), dms::h2o_policy(dms::h2o_params{7, 2}),
                       lengths, 5, 700);
  check_prefill<dms::bfloat16>(step_config(2, 2, 8, 4, 512), dms::h2o_policy(dms::h2o_params{6, 0}),
                               lengths, 4, 701);
  check_prefill<float>(step_config(2, 2, 8, 4, 512), dms::tova_policy(dms::tova_params{6}), lengths,
                       3, 710);
  check_prefill<dms::bfloat16>(step_config(1, 4, 8, 16, 128), dms::tova_policy(dms::tova_params{9}),
                               lengths, 7, 711);
  check_prefill<float>(step_config(2, 2, 8, 4, 512),
                       dms::snapkv_policy(dms::snapkv_params{8, 3, 5, dms::snapkv_pooling::max}),
                       lengths, 5, 720);
  check_prefill<dms::bfloat16>(
      step_config(2, 2, 8, 4, 512),
      dms::snapkv_policy(dms::snapkv_params{10, 4, 7, dms::snapkv_pooling::avg}), lengths, 6, 721);
  check_prefill<float>(step_config(2, 2, 8, 4, 512),
                       dms::streaming_llm_policy(dms::streaming_params{2, 4}), lengths, 4, 730);
}

TEST_CASE("prompt compression: bad batches change nothing, and a set status sticks",
          "[step][prompt][errors]") {
  std::mt19937 rng(800);
  const auto cfg = step_config(2, 2, 4, 4, 256);
  dms::paged_cache<float, dms::tova_policy> host(cfg, dms::tova_policy(dms::tova_params{3}));
  const auto dp = host.policy().device_form();
  std::vector<std::int32_t> seqs;
  for (int s = 0; s < 3; ++s) seqs.push_back(host.add_sequence());
  append_prompts(host, seqs, {9, 6, 12}, rng);
  write_scores(host, std::span<const std::int32_t>(seqs), score_kind::ties, rng);
  auto img = host.to_image();
  const auto before = img;

  const auto run = [&](std::vector<std::int32_t> ids) {
    return dms::step::finish_prompts(img.state(), dp, std::span<const std::int32_t>(ids));
  };
  // Unknown ids (inactive, negative, past max_sequences), also after a valid one.
  for (const auto& ids : {std::vector<std::int32_t>{5}, std::vector<std::int32_t>{0, 4},
                          std::vector<std::int32_t>{1, -1}, std::vector<std::int32_t>{0, 6}}) {
    INFO("ids " << ids.front() << ", " << ids.back());
    CHECK(run(ids) == dms::step_status::bad_sequence);
    CHECK(img.status == int(dms::step_status::bad_sequence));
    img.status = 0;
    CHECK(dms_test::first_difference(before, img) == "");
  }
  for (const auto& ids : {std::vector<std::int32_t>{1, 1}, std::vector<std::int32_t>{0, 2, 0}}) {
    CHECK(run(ids) == dms::step_status::duplicate_sequence);
    CHECK(img.status == int(dms::step_status::duplicate_sequence));
    img.status = 0;
    CHECK(dms_test::first_difference(before, img) == "");
  }
  // A status already set: nothing happens, the status stays.
  img.status = int(dms::step_status::pool_exhausted);
  CHECK(run({0, 1, 2}) == dms::step_status::pool_exhausted);
  CHECK(img.status == int(dms::step_status::pool_exhausted));
  img.status = 0;
  CHECK(dms_test::first_difference(before, img) == "");
  // An empty batch is fine and does nothing.
  CHECK(run({}) == dms::step_status::ok);
  CHECK(dms_test::first_difference(before, img) == "");
  // Once cleared, the batch runs and matches the host.
  CHECK(run({2, 0, 1}) == dms::step_status::ok);
  for (const int seq : {2, 0, 1}) host.finish_prompt(seq);
  CHECK(dms_test::first_difference(host.to_image(), img) == "");
  CHECK(img.live[0] == 3);
}

TEST_CASE("prompt compression: policies that do not reduce prompts change nothing",
          "[step][prompt]") {
  std::mt19937 rng(900);
  const auto check = [&](auto& host, bool with_logits) {
    const auto dp = host.policy().device_form();
    const int H = host.config().num_kv_heads, d = host.config().head_dim;
    std::vector<std::int32_t> seqs;
    for (int s = 0; s < 4; ++s) seqs.push_back(host.add_sequence());
    std::uniform_real_distribution<float> logit(-1.0f, 1.0f);
    for (int t = 0; t < 13; ++t)
      for (const std::int32_t seq : seqs) {
        if (t >= 3 * seq + 1) continue;
        const auto k = normal_vector(rng, static_cast<std::size_t>(H) * d);
        const auto v = normal_vector(rng, k.size());
        std::vector<float> logits;
        if (with_logits)
          for (int h = 0; h < H; ++h) logits.push_back(logit(rng));
        host.append(seq, k, v, std::span<const float>(logits), true);
      }
    auto img = host.to_image();
    const auto before = img;
    const std::vector<std::int32_t> batch{2, 0, 3, 1};
    CHECK(dms::step::finish_prompts(img.state(), dp, std::span<const std::int32_t>(batch)) ==
          dms::step_status::ok);
    CHECK(dms_test::first_difference(before, img) == "");
    for (const std::int32_t seq : batch) host.finish_prompt(seq);
    CHECK(dms_test::first_difference(host.to_image(), img) == "");
  };
  dms::paged_cache<float, dms::dense_policy> dense(step_config(2, 2, 4, 4, 256));
  check(dense, false);
  dms::paged_cache<dms::bfloat16, dms::dms_policy> dms_cache(step_config(2, 2, 4, 4, 256),
                                                             dms::dms_policy(dms::dms_params{2}));
  check(dms_cache, true);
  dms::paged_cache<float, dms::quest_policy> quest(step_config(2, 2, 4, 4, 256),
                                                   dms::quest_policy(dms::quest_params{8, 2, 2}));
  check(quest, false);
}
