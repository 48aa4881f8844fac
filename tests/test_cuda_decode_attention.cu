// SPDX-License-Identifier: Apache-2.0
// dms::cuda::decode_attention against the CPU reference (dms::reference::decode_attention) on
// host caches uploaded with dms::cuda::device_cache: head_dim 64/128/256, K/V in float, half and
// bfloat16, q/out in the storage type or float, group sizes 1..16 (padded heads, head tiles),
// batches that mix empty rows, single slots, exact page boundaries and long rows that split,
// holes (with NaN poisoned into the K/V of every slot that must not be read), Quest page lists,
// the H2O (add) and TOVA (assign) score folds, the KV-read counter, determinism across runs,
// CUDA graph capture and argument validation.
//
// Tolerances, relative to the largest |reference| entry of the compared array: the reference
// sees the same K/V and the same q (rounded through Q first), so the only differences are fp32
// summation order and the final rounding of out to Q:
//   out: 1e-4 for float output, 5e-3 for half output, 2e-2 for bfloat16 output
//   lse: 1e-4 * max(1, |lse|) (fp32 in both); -inf exactly where the reference has -inf
//   score: 1e-4 relative to the largest |score| (fp32 in both)

#include <cuda_runtime_api.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "dms/cuda/decode_attention.cuh"
#include "dms/cuda/device_buffer.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/dms.hpp"

namespace {

using dms::cuda::check;
using dms::cuda::device_buffer;

template <class Q>
constexpr float out_tolerance() {
  if constexpr (std::is_same_v<Q, float>) {
    return 1e-4f;
  } else if constexpr (std::is_same_v<Q, dms::half>) {
    return 5e-3f;
  } else {
    return 2e-2f;
  }
}
constexpr float lse_tolerance = 1e-4f;
constexpr float score_tolerance = 1e-4f;

// Room for about 16K slots in the pool and 8K in a row, whatever the page size.
dms::cache_config make_config(int kv_heads, int group_size, int head_dim, int page_size = 16) {
  dms::cache_config c;
  c.num_kv_heads = kv_heads;
  c.group_size = group_size;
  c.head_dim = head_dim;
  c.page_size = page_size;
  c.max_pages = (1 << 14) / page_size + 64;
  c.max_sequences = 8;
  c.max_row_slots = 8192;
  return c;
}

std::vector<float> normal(std::mt19937& rng, std::size_t n, float sigma = 1.0f) {
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> x(n);
  for (auto& e : x) e = dist(rng);
  return x;
}

/// Appends n random tokens to every row of seq (random decision logits for DMS).
template <class T, class P>
void append_tokens(dms::paged_cache<T, P>& cache, int seq, int n, std::mt19937& rng) {
  const auto& c = cache.config();
  const auto kn = std::size_t(c.num_kv_heads) * c.head_dim;
  std::normal_distribution<float> logit(-1.0f, 3.0f);
  std::vector<float> logits(std::size_t(c.num_kv_heads));
  for (int t = 0; t < n; ++t) {
    const auto k = normal(rng, kn), v = normal(rng, kn);
    if constexpr (P::uses_decision_logits) {
      for (auto& l : logits) l = logit(rng);
      cache.append(seq, k, v, std::span<const float>(logits));
    } else {
      cache.append(seq, k, v);
    }
  }
}

/// Random queries for a batch, rounded through Q so the reference sees what the kernel sees.
template <class Q>
std::vector<float> random_queries(std::mt19937& rng, const dms::cache_config& c, int batch) {
  auto q = normal(rng, std::size_t(batch) * c.num_query_heads() * c.head_dim);
  for (auto& x : q) x = dms::to_float(dms::from_float<Q>(x));
  return q;
}

template <class T>
T poison() {
  if constexpr (std::is_same_v<T, float>) {
    return std::numeric_limits<float>::quiet_NaN();
  } else if constexpr (std::is_same_v<T, dms::half>) {
    return dms::half::from_bits(0x7e00);
  } else {
    return dms::bfloat16::from_bits(0x7fc0);
  }
}

/// In an image: turns the live slots s of `row` with drop(s) into holes (the device hole list
/// encoding, so positions < -1 occur too).
template <class T, class Drop>
void punch_holes(dms::cache_image<T>& img, int row, Drop drop) {
  auto st = img.state();
  for (int s = 0; s < img.row_length[row]; ++s)
    if (st.position[st.slot_index(row, s)] >= 0 && drop(s)) st.push_hole(row, s);
}

/// In an image: NaN into the K and V of every slot no attention may read (holes, and the slots
/// of a row's last page past its length), so reading one would show in the output.
template <class T>
void poison_unread(dms::cache_image<T>& img) {
  const auto& c = img.config;
  auto st = img.state();
  const auto fill = [&](std::int64_t at) {
    std::fill_n(img.k.begin() + at * c.head_dim, c.head_dim, poison<T>());
    std::fill_n(img.v.begin() + at * c.head_dim, c.head_dim, poison<T>());
  };
  for (int r = 0; r < c.max_rows(); ++r) {
    const int len = img.row_length[r];
    const int spanned = (len + c.page_size - 1) / c.page_size * c.page_size;
    for (int s = 0; s < spanned; ++s) {
      const std::int64_t at = st.slot_index(r, s);
      if (s >= len || st.position[at] < 0) fill(at);
    }
  }
}

struct batch_result {
  std::vector<float> out, lse, score;
  std::int64_t reads = 0;
};

/// The reference over the batch, in batch order. Folds scores into the host cache as its policy
/// says, and reports them (whole image) if the policy keeps any.
template <class T, class P>
batch_result reference_batch(dms::paged_cache<T, P>& host, const std::vector<std::int32_t>& seqs,
                             const std::vector<float>& q, float softmax_scale = 0.0f) {
  const auto& c = host.config();
  const auto heads = std::size_t(c.num_query_heads());
  const auto n = heads * c.head_dim;
  batch_result r;
  r.out.assign(seqs.size() * n, 0.0f);
  r.lse.assign(seqs.size() * heads, 0.0f);
  const std::int64_t before = host.stats().kv_token_reads;
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    dms::reference::decode_extras extras;
    extras.lse = std::span<float>(r.lse).subspan(b * heads, heads);
    extras.softmax_scale = softmax_scale;
    dms::reference::decode_attention(host, seqs[b], std::span<const float>(q).subspan(b * n, n),
                                     std::span<float>(r.out).subspan(b * n, n), extras);
  }
  r.reads = host.stats().kv_token_reads - before;
  if constexpr (P::keeps_scores) r.score = host.to_image().score;
  return r;
}

/// What a device run takes besides the cache, the batch and q.
struct device_inputs {
  std::vector<std::int32_t> pages, page_counts;  // empty: no page selection
  int page_stride = 0;
  dms::score_update fold = dms::score_update::none;
  int num_sms = 0;
  float softmax_scale = 0.0f;
};

template <class T, class Q, class P>
batch_result device_batch(const dms::cuda::device_cache<T, P>& dev,
                          const std::vector<std::int32_t>& seqs, const std::vector<float>& q,
                          const device_inputs& in = {}, cudaStream_t stream = nullptr) {
  const auto& c = dev.config();
  const int batch = int(seqs.size());
  const auto heads = std::size_t(batch) * c.num_query_heads();
  std::vector<Q> hq(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) hq[i] = dms::from_float<Q>(q[i]);

  device_buffer<std::int32_t> d_seqs(seqs.size());
  d_seqs.upload(seqs, stream);
  device_buffer<Q> d_q(q.size()), d_out(q.size());
  d_q.upload(hq, stream);
  device_buffer<float> d_lse(heads);
  device_buffer<std::int64_t> d_reads(1);
  d_reads.upload(std::vector<std::int64_t>{0}, stream);
  device_buffer<std::int32_t> d_pages(in.pages.size()), d_counts(in.page_counts.size());
  dms::cuda::decode_options opt;
  opt.lse = d_lse.data();
  opt.kv_reads = d_reads.data();
  opt.num_sms = in.num_sms;
  opt.softmax_scale = in.softmax_scale;
  if (!in.pages.empty()) {
    d_pages.upload(in.pages, stream);
    d_counts.upload(in.page_counts, stream);
    opt.pages = d_pages.data();
    opt.page_counts = d_counts.data();
    opt.page_stride = in.page_stride;
  }
  if (in.fold != dms::score_update::none) {
    opt.fold = in.fold;
    opt.score = dev.state().score;
    opt.max_pages = c.max_pages;
  }

  const auto view = dev.view().read_only();
  std::size_t bytes = 0;
  REQUIRE(dms::cuda::decode_attention<T, Q>(nullptr, bytes, view, d_seqs.data(), batch, d_q.data(),
                                            d_out.data(), opt, stream) == cudaSuccess);
  device_buffer<unsigned char> temp(bytes);
  REQUIRE(dms::cuda::decode_attention<T, Q>(temp.data(), bytes, view, d_seqs.data(), batch,
                                            d_q.data(), d_out.data(), opt, stream) == cudaSuccess);
  check(cudaStreamSynchronize(stream), "decode_attention");

  batch_result r;
  std::vector<Q> hout;
  d_out.download(hout, stream);
  r.out.resize(hout.size());
  for (std::size_t i = 0; i < hout.size(); ++i) r.out[i] = dms::to_float(hout[i]);
  d_lse.download(r.lse, stream);
  std::vector<std::int64_t> reads;
  d_reads.download(reads, stream);
  r.reads = reads[0];
  if constexpr (P::keeps_scores) r.score = dev.download(stream).score;
  return r;
}

float max_abs(const std::vector<float>& x) {
  float m = 0.0f;
  for (const float e : x) m = std::max(m, std::fabs(e));
  return m;
}

/// max |got - want| <= tol * max |want|, and every entry finite.
void compare(const std::vector<float>& got, const std::vector<float>& want, float tol,
             const char* what) {
  REQUIRE(got.size() == want.size());
  const float scale = std::max(max_abs(want), 1e-20f);
  float worst = 0.0f;
  std::size_t worst_at = 0, bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const float err = std::fabs(got[i] - want[i]);
    if (!(err <= tol * scale)) ++bad;  // NaN counts as bad
    if (!(err <= worst)) {
      worst = std::isnan(err) ? std::numeric_limits<float>::infinity() : err;
      worst_at = i;
    }
  }
  INFO(what << ": worst error " << worst << " at " << worst_at << " (got "
            << (got.empty() ? 0.0f : got[worst_at]) << ", want "
            << (want.empty() ? 0.0f : want[worst_at]) << "), scale " << scale << ", tolerance "
            << tol << ", " << bad << " entries out of tolerance");
  CHECK(bad == 0);
}

void compare_lse(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const bool ok = std::isinf(want[i]) ? got[i] == want[i]
                                        : std::fabs(got[i] - want[i]) <=
                                              lse_tolerance * std::max(1.0f, std::fabs(want[i]));
    if (!ok && bad++ == 0) first = i;
  }
  INFO("lse: " << bad << " entries out of tolerance; first at " << first << ": got "
               << (got.empty() ? 0.0f : got[first]) << ", want "
               << (want.empty() ? 0.0f : want[first]));
  CHECK(bad == 0);
}

template <class Q>
void compare_results(const batch_result& got, const batch_result& want) {
  compare(got.out, want.out, out_tolerance<Q>(), "out");
  compare_lse(got.lse, want.lse);
  CHECK(got.reads == want.reads);
}

// A batch that mixes everything the plan must handle: a long row that splits, an empty
// sequence, a single slot, exact page boundaries and one past, and rows with holes (a random
// third, a holed prefix spanning whole chunks, and a row of holes only), in an order that is not
// the sequence ids'. Returns the batch's sequence ids; the host cache holds the holes too.
template <class T, class P>
std::vector<std::int32_t> build_mixed_batch(dms::paged_cache<T, P>& host, std::mt19937& rng,
                                            int long_length = 5000) {
  const int H = host.config().num_kv_heads;
  const int lengths[] = {long_length, 0, 1, 16, 17, 32, 600};
  std::vector<int> ids;
  for (const int n : lengths) {
    const int seq = host.add_sequence();
    append_tokens(host, seq, n, rng);
    ids.push_back(seq);
  }
  auto img = host.to_image();
  std::bernoulli_distribution third(1.0 / 3.0), tenth(0.1);
  const int holed = ids[6] * H;
  punch_holes(img, holed, [&](int s) { return s < 300 || third(rng); });
  if (H > 1) punch_holes(img, holed + 1, [](int) { return true; });
  punch_holes(img, ids[0] * H + H - 1, [&](int) { return tenth(rng); });
  poison_unread(img);
  host.load_image(img);
  return {ids[4], ids[0], ids[1], ids[6], ids[2], ids[5], ids[3]};
}

template <class T, class Q>
void check_mixed(int head_dim, int group_size, unsigned seed, int page_size = 16,
                 int long_length = 5000) {
  INFO("T = " << dms::dtype_name(dms::dtype_of<T>) << ", Q = " << dms::dtype_name(dms::dtype_of<Q>)
              << ", head_dim " << head_dim << ", group_size " << group_size << ", page_size "
              << page_size);
  std::mt19937 rng(seed);
  dms::paged_cache<T> host(make_config(2, group_size, head_dim, page_size));
  const auto seqs = build_mixed_batch(host, rng, long_length);
  const dms::cuda::device_cache<T, dms::dense_policy> dev(host);
  const auto q = random_queries<Q>(rng, host.config(), int(seqs.size()));
  const auto got = device_batch<T, Q>(dev, seqs, q);
  const auto want = reference_batch(host, seqs, q);
  compare_results<Q>(got, want);
}

}  // namespace

TEST_CASE("decode_attention matches the reference: head dims, storage types, group sizes",
          "[gpu][decode_attention]") {
  unsigned seed = 1;
  for (const int d : {64, 128, 256})
    for (const int g : {1, 4, 8}) {
      check_mixed<float, float>(d, g, seed++);
      check_mixed<dms::half, dms::half>(d, g, seed++);
      check_mixed<dms::bfloat16, dms::bfloat16>(d, g, seed++);
    }
}

TEST_CASE("decode_attention: float queries over 16-bit storage, odd and large groups",
          "[gpu][decode_attention]") {
  check_mixed<dms::half, float>(128, 4, 101);
  check_mixed<dms::bfloat16, float>(64, 8, 102);
  check_mixed<dms::bfloat16, float>(256, 2, 103);
  check_mixed<float, float>(64, 2, 104);
  check_mixed<dms::bfloat16, dms::bfloat16>(128, 3, 105);      // padded heads
  check_mixed<dms::half, dms::half>(64, 6, 106);               // padded heads, two head tiles
  check_mixed<dms::half, dms::half>(256, 16, 107);             // four head tiles
  check_mixed<float, float>(128, 16, 108);                     // two head tiles of 8
  check_mixed<dms::bfloat16, dms::bfloat16>(128, 4, 109, 12);  // page size not a power of two
  check_mixed<dms::half, float>(64, 1, 110, 1);                // one slot per page
}

TEST_CASE("decode_attention: DMS rows of different lengths per head, a softmax scale",
          "[gpu][decode_attention]") {
  std::mt19937 rng(7);
  dms::paged_cache<dms::bfloat16, dms::dms_policy> host(make_config(4, 4, 128),
                                                        dms::dms_policy({.window = 16}));
  std::vector<std::int32_t> seqs;
  for (const int n : {900, 40, 2500}) {
    const int seq = host.add_sequence();
    append_tokens(host, seq, n, rng);
    seqs.push_back(seq);
  }
  const auto view = host.view();
  bool lengths_differ = false;
  for (const int s : seqs)
    for (int h = 1; h < 4; ++h) lengths_differ |= view.length(s * 4 + h) != view.length(s * 4);
  REQUIRE(lengths_differ);
  const dms::cuda::device_cache<dms::bfloat16, dms::dms_policy> dev(host);
  const auto q = random_queries<dms::bfloat16>(rng, host.config(), int(seqs.size()));
  device_inputs in;
  in.softmax_scale = 0.2f;
  const auto got = device_batch<dms::bfloat16, dms::bfloat16>(dev, seqs, q, in);
  compare_results<dms::bfloat16>(got, reference_batch(host, seqs, q, in.softmax_scale));
}

TEST_CASE("decode_attention: the split does not change the result, and runs are deterministic",
          "[gpu][decode_attention]") {
  std::mt19937 rng(11);
  dms::paged_cache<float> host(make_config(2, 4, 128));
  const auto seqs = build_mixed_batch(host, rng, 3000);
  const dms::cuda::device_cache<float, dms::dense_policy> dev(host);
  const auto q = random_queries<float>(rng, host.config(), int(seqs.size()));
  const auto want = reference_batch(host, seqs, q);
  // 1 SM: few, long chunks; 1000 SMs: chunks of min_chunk and far more blocks than fit.
  for (const int sms : {1, 2, 5, 132, 1000}) {
    INFO("num_sms = " << sms);
    device_inputs in;
    in.num_sms = sms;
    const auto a = device_batch<float, float>(dev, seqs, q, in);
    compare_results<float>(a, want);
    const auto b = device_batch<float, float>(dev, seqs, q, in);
    // Bitwise: an item's math does not depend on which block ran it, nor the merge's on timing.
    const bool same_out = a.out == b.out;
    CHECK(same_out);
    CHECK(std::equal(a.lse.begin(), a.lse.end(), b.lse.begin(),
                     [](float x, float y) { return x == y || (std::isinf(x) && std::isinf(y)); }));
  }
}

namespace {

// Scores folded by the kernel equal the reference's: H2O (add) and TOVA (assign). The rows went
// through attention and eviction on the host first, so they have holes (poisoned) and scores.
template <class T, class Q, class P>
void check_fold(P policy, dms::score_update how, int head_dim, int group_size, unsigned seed) {
  INFO("policy " << policy.name() << ", head_dim " << head_dim << ", group_size " << group_size);
  std::mt19937 rng(seed);
  dms::paged_cache<T, P> host(make_config(3, group_size, head_dim), policy);
  std::vector<std::int32_t> seqs;
  for (const int n : {800, 3000, 50, 0}) {
    const int seq = host.add_sequence();
    append_tokens(host, seq, n, rng);
    seqs.push_back(seq);
  }
  // Two decode steps of attention on the host build scores; the last one evicts to the budget.
  for (int step = 0; step < 2; ++step) {
    for (const int seq : seqs) {
      const auto q = random_queries<Q>(rng, host.config(), 1);
      std::vector<float> out(q.size());
      dms::reference::decode_attention(host, seq, q, out);
    }
  }
  for (const int seq : seqs) host.finish_step(seq);
  REQUIRE(host.view().length(seqs[1] * 3) > host.row_live(seqs[1] * 3));  // holes
  auto img = host.to_image();
  poison_unread(img);
  host.load_image(img);

  const dms::cuda::device_cache<T, P> dev(host);
  const auto q = random_queries<Q>(rng, host.config(), int(seqs.size()));
  device_inputs in;
  in.fold = how;
  const auto got = device_batch<T, Q>(dev, seqs, q, in);
  const auto want = reference_batch(host, seqs, q);
  compare_results<Q>(got, want);
  compare(got.score, want.score, score_tolerance, "score");
}

}  // namespace

TEST_CASE("decode_attention: H2O adds and TOVA assigns the group's probabilities",
          "[gpu][decode_attention]") {
  check_fold<dms::bfloat16, dms::bfloat16>(dms::h2o_policy({.budget = 400, .recent = 32}),
                                           dms::score_update::add, 128, 4, 21);
  check_fold<dms::half, float>(dms::tova_policy({.budget = 400}), dms::score_update::assign, 64, 8,
                               22);
  check_fold<float, float>(dms::h2o_policy({.budget = 300, .recent = 16}), dms::score_update::add,
                           256, 1, 23);
}

namespace {

// Quest: the kernel reads the pages the host policy selects (page lists built on the host from
// the same q), which is what the reference reads.
template <class T, class Q>
void check_quest(int token_budget, unsigned seed) {
  INFO("token_budget " << token_budget);
  std::mt19937 rng(seed);
  const auto cfg = make_config(2, 4, 128);
  dms::paged_cache<T, dms::quest_policy> host(
      cfg, dms::quest_policy({.token_budget = token_budget, .layer = 2, .dense_layers = 2}));
  std::vector<std::int32_t> seqs;
  for (const int n : {5000, 300, 0, 40}) {
    const int seq = host.add_sequence();
    append_tokens(host, seq, n, rng);
    seqs.push_back(seq);
  }
  const auto q = random_queries<Q>(rng, cfg, int(seqs.size()));
  const int H = cfg.num_kv_heads, G = cfg.group_size, D = cfg.head_dim;

  std::vector<std::vector<int>> lists;
  std::size_t stride = 1;
  for (std::size_t b = 0; b < seqs.size(); ++b)
    for (int h = 0; h < H; ++h) {
      std::vector<int> pages;
      const float* qg = q.data() + (b * cfg.num_query_heads() + std::size_t(h) * G) * D;
      host.policy().select_pages(host.row(seqs[b], h), qg, G, D, pages);
      stride = std::max(stride, pages.size() + 1);  // a stride larger than any count
      lists.push_back(pages);
    }
  device_inputs in;
  in.page_stride = int(stride);
  in.pages.assign(lists.size() * stride, -1);
  for (std::size_t r = 0; r < lists.size(); ++r) {
    std::copy(lists[r].begin(), lists[r].end(), in.pages.begin() + r * stride);
    in.page_counts.push_back(std::int32_t(lists[r].size()));
  }

  const dms::cuda::device_cache<T, dms::quest_policy> dev(host);
  const auto got = device_batch<T, Q>(dev, seqs, q, in);
  const auto want = reference_batch(host, seqs, q);
  compare_results<Q>(got, want);
  CHECK(want.reads < 5000 * H);  // the selection did narrow the long row
}

}  // namespace

TEST_CASE("decode_attention: Quest page lists", "[gpu][decode_attention]") {
  check_quest<dms::half, dms::half>(64, 31);    // 4 pages of 19 or 313; partial last page
  check_quest<dms::half, dms::half>(2048, 32);  // 128 pages of 313: the selection splits
  check_quest<dms::bfloat16, float>(512, 33);
}

TEST_CASE("decode_attention: captured in a CUDA graph", "[gpu][decode_attention]") {
  std::mt19937 rng(41);
  dms::paged_cache<dms::half> host(make_config(2, 4, 64));
  const auto seqs = build_mixed_batch(host, rng, 2000);
  const dms::cuda::device_cache<dms::half, dms::dense_policy> dev(host);
  const auto q = random_queries<dms::half>(rng, host.config(), int(seqs.size()));
  const auto direct = device_batch<dms::half, dms::half>(dev, seqs, q);

  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const auto& c = host.config();
  const int batch = int(seqs.size());
  std::vector<dms::half> hq(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) hq[i] = dms::half(q[i]);
  device_buffer<std::int32_t> d_seqs(seqs.size());
  d_seqs.upload(seqs, stream);
  device_buffer<dms::half> d_q(q.size()), d_out(q.size());
  d_q.upload(hq, stream);
  device_buffer<float> d_lse(std::size_t(batch) * c.num_query_heads());
  device_buffer<std::int64_t> d_reads(1);
  d_reads.upload(std::vector<std::int64_t>{0}, stream);
  dms::cuda::decode_options opt;  // num_sms = 0: the device is asked during capture
  opt.lse = d_lse.data();
  opt.kv_reads = d_reads.data();
  const auto view = dev.view().read_only();
  std::size_t bytes = 0;
  REQUIRE(dms::cuda::decode_attention(nullptr, bytes, view, d_seqs.data(), batch, d_q.data(),
                                      d_out.data(), opt, stream) == cudaSuccess);
  device_buffer<unsigned char> temp(bytes);

  cudaGraph_t graph = nullptr;
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
  const cudaError_t launched = dms::cuda::decode_attention(
      temp.data(), bytes, view, d_seqs.data(), batch, d_q.data(), d_out.data(), opt, stream);
  check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
  REQUIRE(launched == cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  for (int replay = 0; replay < 2; ++replay)
    check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

  std::vector<dms::half> hout;
  d_out.download(hout, stream);
  std::vector<float> out(hout.size()), lse;
  for (std::size_t i = 0; i < hout.size(); ++i) out[i] = dms::to_float(hout[i]);
  d_lse.download(lse, stream);
  std::vector<std::int64_t> reads;
  d_reads.download(reads, stream);
  const bool same_out = out == direct.out;
  CHECK(same_out);
  CHECK(std::equal(lse.begin(), lse.end(), direct.lse.begin(),
                   [](float x, float y) { return x == y || (std::isinf(x) && std::isinf(y)); }));
  CHECK(reads[0] == 2 * direct.reads);
  check(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
  check(cudaGraphDestroy(graph), "cudaGraphDestroy");
  check(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

// The subset bench/gpu_check/run.sh runs under compute-sanitizer (memcheck, racecheck, synccheck,
// initcheck): every kernel of decode_attention (plan, attend, merge, fold) at small shapes, over
// the three storage types, the three head dims and head tiles of 1, 2, 4 and 8 heads.
TEST_CASE("decode_attention: small shapes for the sanitizers",
          "[gpu][decode_attention][sanitize]") {
  check_mixed<dms::bfloat16, dms::bfloat16>(128, 4, 301, 16, 700);
  check_mixed<dms::half, float>(64, 8, 302, 16, 700);  // two head tiles of 4
  check_mixed<float, float>(256, 2, 303, 16, 700);
  check_mixed<float, float>(128, 16, 304, 16, 300);                 // two head tiles of 8
  check_mixed<dms::bfloat16, dms::bfloat16>(128, 3, 305, 12, 300);  // padded heads, odd pages
  check_fold<dms::bfloat16, dms::bfloat16>(dms::h2o_policy({.budget = 400, .recent = 32}),
                                           dms::score_update::add, 128, 4, 306);
  check_fold<dms::half, float>(dms::tova_policy({.budget = 400}), dms::score_update::assign, 64, 8,
                               307);
  check_quest<dms::half, dms::half>(64, 308);
}

TEST_CASE("decode_attention: invalid arguments are rejected", "[gpu][decode_attention]") {
  dms::cache_view<const float> v{};
  v.num_kv_heads = 2;
  v.group_size = 4;
  v.head_dim = 128;
  v.page_size = 16;
  v.max_pages_per_row = 64;
  v.max_rows = 16;
  dms::cuda::decode_options opt;
  opt.num_sms = 4;  // no device query
  std::size_t bytes = 0;
  const auto size_query = [&](const dms::cache_view<const float>& view,
                              const dms::cuda::decode_options& o, int batch = 2) {
    bytes = 0;
    return dms::cuda::decode_attention<float, float>(nullptr, bytes, view, nullptr, batch, nullptr,
                                                     nullptr, o);
  };
  REQUIRE(size_query(v, opt) == cudaSuccess);
  CHECK(bytes > 0);

  for (const int d : {0, 32, 96, 192, 512}) {
    auto w = v;
    w.head_dim = d;
    CHECK(size_query(w, opt) == cudaErrorInvalidValue);
  }
  for (const int g : {0, 17, 64}) {
    auto w = v;
    w.group_size = g;
    CHECK(size_query(w, opt) == cudaErrorInvalidValue);
  }
  CHECK(size_query(v, opt, -1) == cudaErrorInvalidValue);
  {
    auto o = opt;
    o.fold = dms::score_update::add;  // no max_pages
    CHECK(size_query(v, o) == cudaErrorInvalidValue);
    o.max_pages = 32;
    CHECK(size_query(v, o) == cudaSuccess);
    const std::size_t with_fold = bytes;
    CHECK(size_query(v, opt) == cudaSuccess);
    CHECK(with_fold >= bytes + std::size_t(32) * 16 * 4 * sizeof(float));
  }
  {
    static const std::int32_t dummy = 0;
    auto o = opt;
    o.pages = &dummy;  // no page_counts, no stride
    CHECK(size_query(v, o) == cudaErrorInvalidValue);
    o.page_counts = &dummy;
    CHECK(size_query(v, o) == cudaErrorInvalidValue);
    o.page_stride = 65;  // > max_pages_per_row
    CHECK(size_query(v, o) == cudaErrorInvalidValue);
    o.page_stride = 8;
    CHECK(size_query(v, o) == cudaSuccess);
  }
  {
    auto o = opt;
    o.num_sms = -1;
    CHECK(size_query(v, o) == cudaErrorInvalidValue);
  }
  // The size depends on the shapes and num_sms only.
  CHECK(size_query(v, opt) == cudaSuccess);
  const std::size_t need = bytes;
  {
    auto w = v;
    w.max_pages_per_row = 1000;
    w.max_rows = 1000;
    CHECK(size_query(w, opt) == cudaSuccess);
    CHECK(bytes == need);
  }

  // With storage: too little temp, and missing pointers.
  device_buffer<unsigned char> temp(need);
  std::size_t small = need - 1;
  CHECK(dms::cuda::decode_attention<float, float>(temp.data(), small, v, nullptr, 2, nullptr,
                                                  nullptr, opt) == cudaErrorInvalidValue);
  std::size_t enough = need;
  CHECK(dms::cuda::decode_attention<float, float>(temp.data(), enough, v, nullptr, 2, nullptr,
                                                  nullptr, opt) == cudaErrorInvalidValue);
  // An empty batch launches nothing.
  CHECK(size_query(v, opt, 0) == cudaSuccess);
  std::size_t empty = bytes;
  CHECK(dms::cuda::decode_attention<float, float>(temp.data(), empty, v, nullptr, 0, nullptr,
                                                  nullptr, opt) == cudaSuccess);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}
