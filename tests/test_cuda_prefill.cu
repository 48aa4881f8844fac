// SPDX-License-Identifier: Apache-2.0
// GPU prefill (dms/cuda/prefill.cuh, dms/cuda/prefill_attention.cuh) against the CPU reference.
//
// Each case builds a batch of left-padded prompts, prefills it on the GPU (dms::cuda::prefill,
// chunked) and on the host (dms::reference::prefill_chunk, chunk by chunk, sequences in batch
// order within a chunk: the order in which the GPU chunk append hands out pages), then
// compares
//   * the whole caches: first_difference of the images must be empty: slots, positions, page
//     ids, the free stack, rings, counters and K/V bits are equal, not just close;
//   * the attention outputs, relative to the largest |output| of the case:
//       bfloat16 2e-2, half 5e-3 (P is rounded to the storage type for P.V on tensor cores, and
//       outputs are stored in it: ~2^-9 and ~2^-11 relative), float 1e-4 (SIMT, fp32 throughout);
//     padding tokens output exactly 0;
//   * lse (natural log): within 2e-3 absolute (fp32 logits and sums on both sides), -inf exactly
//     for padding tokens.
// Inputs are exactly representable in the storage type, so the reference (float inputs) and the
// GPU (storage-type inputs) see the same numbers. Then a few decode appends (dms::cuda::append
// vs paged_cache::append) and, optionally, a second prompt (a later turn, t0 > 0) run on both,
// and the caches must still be equal.
//
// TOVA, H2O and SnapKV also score the prompt on the GPU (dms/cuda/prompt_scores.cuh) and every
// training-free policy reduces it at the end (dms/cuda/prompt_compression.cuh): the scores must
// be close (compare_caches) and the kept tokens, slots and pages identical. finish_prompts alone
// is checked bit for bit on hand-set scores full of ties.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "dms/cuda/bookkeeping.cuh"
#include "dms/cuda/device_buffer.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/cuda/prefill.cuh"
#include "dms/dms.hpp"
#include "support/image_compare.hpp"

namespace {

enum class flags { none, all, random };

struct prefill_case {
  int kv_heads = 2;
  int group = 4;
  int head_dim = 128;
  int page_size = 16;
  std::vector<int> lengths = {45, 70, 3};  // real tokens per sequence (padded to the longest)
  int chunk = 7;
  flags flagged = flags::random;
  bool tensor_cores = true;
  int decode_steps = 3;
  int second_prompt = 0;  // tokens of a later prompt after the decode steps (0 = none)
  unsigned seed = 1;
};

std::string describe(const prefill_case& c) {
  std::ostringstream s;
  s << "kv_heads " << c.kv_heads << ", G " << c.group << ", head_dim " << c.head_dim << ", chunk "
    << c.chunk << ", lengths";
  for (const int l : c.lengths) s << ' ' << l;
  s << (c.flagged == flags::none  ? ", none flagged"
        : c.flagged == flags::all ? ", all flagged"
                                  : ", random flags")
    << (c.tensor_cores ? "" : ", SIMT");
  return s.str();
}

template <class T>
double output_tolerance() {
  if constexpr (std::is_same_v<T, dms::bfloat16>) {
    return 2e-2;
  } else if constexpr (std::is_same_v<T, dms::half>) {
    return 5e-3;
  } else {
    return 1e-4;
  }
}
constexpr double lse_tolerance = 2e-3;

template <class T>
float round_to(float x) {
  return dms::to_float(dms::from_float<T>(x));
}

template <class T>
std::vector<T> to_storage(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = dms::from_float<T>(x[i]);
  return out;
}

template <class T>
dms::cuda::device_buffer<T> upload(const std::vector<T>& h) {
  dms::cuda::device_buffer<T> d(h.size());
  d.upload(h, nullptr);
  return d;
}

// Prompts of a batch, token-major, left-padded to the longest, already rounded to T.
struct prompts {
  int batch = 0, tokens = 0;
  std::vector<float> q, k, v, logits;
  std::vector<std::int32_t> padding, lengths;
};

template <class T>
prompts make_prompts(const dms::cache_config& cfg, const std::vector<int>& lengths, flags mode,
                     std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  prompts p;
  p.batch = int(lengths.size());
  p.tokens = *std::max_element(lengths.begin(), lengths.end());
  const auto tokens = std::size_t(p.batch) * p.tokens;
  const auto H = std::size_t(cfg.num_kv_heads), d = std::size_t(cfg.head_dim);
  p.q.resize(tokens * H * cfg.group_size * d);
  p.k.resize(tokens * H * d);
  p.v.resize(tokens * H * d);
  p.logits.resize(tokens * H);
  for (auto& x : p.q) x = round_to<T>(3.0f * normal(rng));  // peaked attention
  for (auto& x : p.k) x = round_to<T>(uniform(rng));
  for (auto& x : p.v) x = round_to<T>(uniform(rng));
  for (auto& x : p.logits)
    x = mode == flags::none  ? -2.0f
        : mode == flags::all ? 2.0f
                             : (uniform(rng) < 0.5f ? 1.5f : -1.5f);
  for (const int l : lengths) {
    p.lengths.push_back(l);
    p.padding.push_back(p.tokens - l);
  }
  return p;
}

// Host reference: chunk by chunk, the sequences of the batch in order within a chunk, then the
// prompts end in batch order (the GPU appends every sequence's last chunk before it compresses).
template <class T, class P>
void host_prefill(dms::paged_cache<T, P>& host, const std::vector<std::int32_t>& seqs,
                  const prompts& p, int chunk, std::vector<float>& out, std::vector<float>& lse) {
  const dms::cache_config& cfg = host.config();
  const std::size_t H = std::size_t(cfg.num_kv_heads), Hq = std::size_t(cfg.num_query_heads());
  const std::size_t qrow = Hq * cfg.head_dim, krow = H * cfg.head_dim;
  out.assign(p.q.size(), 0.0f);
  lse.assign(std::size_t(p.batch) * p.tokens * Hq, 0.0f);
  std::vector<int> prompt_length(p.batch);
  for (int b = 0; b < p.batch; ++b)
    prompt_length[b] = host.tokens_seen(host.row_index(seqs[b], 0)) + p.lengths[b];
  for (int begin = 0; begin < p.tokens; begin += chunk) {
    const int len = std::min(chunk, p.tokens - begin);
    for (int b = 0; b < p.batch; ++b) {
      const std::size_t t = std::size_t(b) * p.tokens + begin, n = std::size_t(len);
      const dms::reference::prefill_chunk_inputs in{
          std::span<const float>(p.q).subspan(t * qrow, n * qrow),
          std::span<const float>(p.k).subspan(t * krow, n * krow),
          std::span<const float>(p.v).subspan(t * krow, n * krow),
          std::span<const float>(p.logits).subspan(t * H, n * H),
          std::clamp(p.padding[b] - begin, 0, len)};
      dms::reference::prefill_chunk(host, seqs[b], in, prompt_length[b],
                                    {std::span<float>(out).subspan(t * qrow, n * qrow),
                                     std::span<float>(lse).subspan(t * Hq, n * Hq), 0.0f},
                                    dms::reference::end_of_prompt::defer);
    }
  }
  for (const std::int32_t seq : seqs) host.finish_prompt(seq);
}

// The caches must be equal; scores (attention probabilities summed in a different order) only
// close: within 1e-4 relative, 1e-6 absolute. Then the device's scores are replaced by the
// host's and the images must be identical, which also shows that both kept the same tokens.
template <class T>
void compare_caches(const dms::cache_image<T>& ref, dms::cache_image<T> got) {
  if (!ref.score.empty() && ref.score.size() == got.score.size()) {
    int bad = 0;
    for (std::size_t i = 0; i < ref.score.size(); ++i) {
      if (ref.position[i] < 0 || got.position[i] != ref.position[i]) continue;
      const double e = std::fabs(double(ref.score[i]) - double(got.score[i]));
      if (!(e <= 1e-4 * std::fabs(double(ref.score[i])) + 1e-6) && bad++ == 0)
        UNSCOPED_INFO("first bad score at flat slot " << i << " (position " << ref.position[i]
                                                      << "): reference " << ref.score[i] << ", GPU "
                                                      << got.score[i]);
    }
    CHECK(bad == 0);
    got.score = ref.score;
  }
  REQUIRE(dms_test::first_difference(ref, got) == "");
}

// The same prompts through dms::cuda::prefill; returns the outputs as float.
template <class T, class P>
void device_prefill(dms::cuda::device_cache<T, P>& dev, const std::vector<std::int32_t>& seqs,
                    const prompts& p, int chunk, bool tensor_cores, bool with_padding,
                    std::vector<float>& out, std::vector<float>& lse) {
  const auto d_seqs = upload(seqs);
  const auto d_q = upload(to_storage<T>(p.q));
  const auto d_k = upload(to_storage<T>(p.k));
  const auto d_v = upload(to_storage<T>(p.v));
  const auto d_logits = upload(p.logits);
  const auto d_padding = upload(p.padding);
  dms::cuda::device_buffer<T> d_out(p.q.size());
  dms::cuda::device_buffer<float> d_lse(std::size_t(p.batch) * p.tokens *
                                        dev.config().num_query_heads());

  dms::cuda::prefill_batch<T> in;
  in.seq_ids = d_seqs.data();
  in.batch = p.batch;
  in.tokens = p.tokens;
  in.q = d_q.data();
  in.k = d_k.data();
  in.v = d_v.data();
  in.decision_logits = d_logits.data();
  in.padding = with_padding ? d_padding.data() : nullptr;
  in.out = d_out.data();
  in.lse = d_lse.data();
  in.allow_tensor_cores = tensor_cores;

  std::size_t temp_bytes = 0;
  REQUIRE(dms::cuda::prefill(nullptr, temp_bytes, dev, in, chunk) == cudaSuccess);
  dms::cuda::device_buffer<unsigned char> temp(std::max<std::size_t>(temp_bytes, 1));
  REQUIRE(dms::cuda::prefill(temp.data(), temp_bytes, dev, in, chunk) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);

  std::vector<T> raw;
  d_out.download(raw, nullptr);
  out.resize(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) out[i] = dms::to_float(raw[i]);
  d_lse.download(lse, nullptr);
}

template <class T>
void compare_outputs(const std::vector<float>& ref, const std::vector<float>& got,
                     const std::vector<float>& ref_lse, const std::vector<float>& got_lse) {
  REQUIRE(ref.size() == got.size());
  REQUIRE(ref_lse.size() == got_lse.size());
  double largest = 0.0, worst = 0.0;
  std::size_t worst_at = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    largest = std::max(largest, double(std::fabs(ref[i])));
    const double e = std::fabs(double(ref[i]) - double(got[i]));
    if (!(e <= worst)) {  // also catches NaN
      worst = std::isnan(e) ? INFINITY : e;
      worst_at = i;
    }
  }
  INFO("largest |out| " << largest << ", worst error " << worst << " at element " << worst_at);
  CHECK(worst <= output_tolerance<T>() * std::max(largest, 1e-3));
  int lse_bad = 0;
  for (std::size_t i = 0; i < ref_lse.size(); ++i) {
    const bool ok = std::isinf(ref_lse[i])
                        ? (std::isinf(got_lse[i]) && got_lse[i] < 0)
                        : std::fabs(double(ref_lse[i]) - double(got_lse[i])) <= lse_tolerance;
    if (!ok && lse_bad++ == 0)
      UNSCOPED_INFO("first bad lse[" << i << "]: reference " << ref_lse[i] << ", GPU "
                                     << got_lse[i]);
  }
  CHECK(lse_bad == 0);
}

// Padding tokens output exactly 0 on the GPU.
void check_padding_zero(const prompts& p, int row_elems, const std::vector<float>& got) {
  int bad = 0;
  for (int b = 0; b < p.batch; ++b)
    for (int t = 0; t < p.padding[b]; ++t)
      for (int x = 0; x < row_elems; ++x)
        bad += got[(std::size_t(b) * p.tokens + t) * row_elems + x] != 0.0f ? 1 : 0;
  CHECK(bad == 0);
}

template <class T, class P>
void decode_steps(dms::paged_cache<T, P>& host, dms::cuda::device_cache<T, P>& dev,
                  const std::vector<std::int32_t>& seqs, int steps, std::mt19937& rng) {
  const dms::cache_config& cfg = host.config();
  const int B = int(seqs.size());
  const std::size_t krow = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const auto d_seqs = upload(seqs);
  std::size_t temp_bytes = 0;
  REQUIRE(dms::cuda::append(nullptr, temp_bytes, dev.state(), dev.device_policy(), d_seqs.data(), B,
                            static_cast<const float*>(nullptr), static_cast<const float*>(nullptr),
                            nullptr, false) == cudaSuccess);
  dms::cuda::device_buffer<unsigned char> temp(temp_bytes);
  for (int step = 0; step < steps; ++step) {
    std::vector<float> k(B * krow), v(B * krow), logits(std::size_t(B) * cfg.num_kv_heads);
    for (auto& x : k) x = uniform(rng);
    for (auto& x : v) x = uniform(rng);
    for (auto& x : logits) x = uniform(rng);
    for (int b = 0; b < B; ++b)
      host.append(seqs[b], std::span<const float>(k).subspan(b * krow, krow),
                  std::span<const float>(v).subspan(b * krow, krow),
                  std::span<const float>(logits).subspan(std::size_t(b) * cfg.num_kv_heads,
                                                         std::size_t(cfg.num_kv_heads)));
    const auto d_k = upload(k), d_v = upload(v), d_logits = upload(logits);
    REQUIRE(dms::cuda::append(temp.data(), temp_bytes, dev.state(), dev.device_policy(),
                              d_seqs.data(), B, d_k.data(), d_v.data(), d_logits.data(),
                              false) == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  }
}

template <class T, class P>
void check_prefill(const prefill_case& pc, P policy) {
  INFO(describe(pc));
  dms::cache_config cfg;
  cfg.num_kv_heads = pc.kv_heads;
  cfg.group_size = pc.group;
  cfg.head_dim = pc.head_dim;
  cfg.page_size = pc.page_size;
  cfg.max_sequences = int(pc.lengths.size()) + 1;
  cfg.max_row_slots = 1024;
  cfg.max_pages = cfg.max_sequences * cfg.num_kv_heads * (cfg.max_row_slots / cfg.page_size);
  std::mt19937 rng(pc.seed);

  // Sequence ids 1..B (id 0 added and removed, so its pages went back), the batch in reverse.
  dms::paged_cache<T, P> host(cfg, policy);
  for (std::size_t i = 0; i <= pc.lengths.size(); ++i) (void)host.add_sequence();
  host.remove_sequence(0);
  std::vector<std::int32_t> seqs;
  for (int s = int(pc.lengths.size()); s >= 1; --s) seqs.push_back(s);
  dms::cuda::device_cache<T, P> dev(host);

  const prompts p = make_prompts<T>(cfg, pc.lengths, pc.flagged, rng);
  std::vector<float> ref_out, ref_lse, got_out, got_lse;
  host_prefill(host, seqs, p, pc.chunk, ref_out, ref_lse);
  device_prefill(dev, seqs, p, pc.chunk, pc.tensor_cores, true, got_out, got_lse);
  CHECK(dev.status() == dms::step_status::ok);
  compare_caches(host.to_image(), dev.download());
  compare_outputs<T>(ref_out, got_out, ref_lse, got_lse);
  check_padding_zero(p, cfg.num_query_heads() * cfg.head_dim, got_out);

  decode_steps(host, dev, seqs, pc.decode_steps, rng);
  CHECK(dev.status() == dms::step_status::ok);
  compare_caches(host.to_image(), dev.download());

  if (pc.second_prompt > 0) {  // a later turn: the cache holds prompt + decode tokens
    const prompts p2 = make_prompts<T>(cfg, std::vector<int>(pc.lengths.size(), pc.second_prompt),
                                       pc.flagged, rng);
    host_prefill(host, seqs, p2, pc.chunk, ref_out, ref_lse);
    device_prefill(dev, seqs, p2, pc.chunk, pc.tensor_cores, false, got_out, got_lse);
    CHECK(dev.status() == dms::step_status::ok);
    compare_caches(host.to_image(), dev.download());
    compare_outputs<T>(ref_out, got_out, ref_lse, got_lse);
  }
}

}  // namespace

TEST_CASE("GPU prefill == reference: DMS, bfloat16, tensor cores", "[gpu][prefill][dms]") {
  for (const int window : {4, 16})
    for (const int chunk : {1, 7, 1000})
      for (const flags f : {flags::none, flags::all, flags::random}) {
        prefill_case c;
        c.chunk = chunk;
        c.flagged = f;
        c.second_prompt = 9;
        c.seed = unsigned(window * 100 + chunk + int(f));
        INFO("window " << window);
        check_prefill<dms::bfloat16>(c, dms::dms_policy{{.window = window}});
      }
}

TEST_CASE("GPU prefill == reference: DMS, GQA 1/4/8, head_dim 64/128, half",
          "[gpu][prefill][dms]") {
  for (const int group : {1, 4, 8})
    for (const int head_dim : {64, 128}) {
      prefill_case c;
      c.kv_heads = group == 8 ? 1 : 3;
      c.group = group;
      c.head_dim = head_dim;
      c.lengths = {29, 64, 65};
      c.chunk = 13;
      c.seed = unsigned(group * 1000 + head_dim);
      check_prefill<dms::half>(c, dms::dms_policy{{.window = 4}});
    }
}

TEST_CASE("GPU prefill == reference: long prompts span many key tiles", "[gpu][prefill][dms]") {
  // 300 tokens, window 16: the cached keys, the chunk's survivors and the window each take
  // several 64-key tiles; one-shot (chunk > T) reads survivors + window only.
  for (const int chunk : {128, 1000})
    for (const int window : {16, 100}) {
      prefill_case c;
      c.lengths = {300, 251};
      c.chunk = chunk;
      c.second_prompt = 70;
      c.seed = unsigned(chunk + window);
      INFO("window " << window);
      check_prefill<dms::bfloat16>(c, dms::dms_policy{{.window = window}});
    }
}

TEST_CASE("GPU prefill == reference: dense, half, chunk sizes and GQA", "[gpu][prefill][dense]") {
  for (const int chunk : {1, 7, 1000})
    for (const int group : {1, 8}) {
      prefill_case c;
      c.group = group;
      c.head_dim = group == 8 ? 64 : 128;
      c.chunk = chunk;
      c.second_prompt = 5;
      c.seed = unsigned(chunk * 10 + group);
      check_prefill<dms::half>(c, dms::dense_policy{});
    }
}

TEST_CASE("GPU prefill == reference: batch of one without padding", "[gpu][prefill][dms]") {
  prefill_case c;
  c.lengths = {77};
  c.chunk = 32;
  check_prefill<dms::bfloat16>(c, dms::dms_policy{{.window = 16}});
  check_prefill<dms::half>(c, dms::dense_policy{});
}

TEST_CASE("GPU prefill == reference: the SIMT kernel (float, and half/bfloat16 forced)",
          "[gpu][prefill][simt]") {
  for (const int head_dim : {32, 64, 128}) {
    prefill_case c;
    c.head_dim = head_dim;
    c.chunk = 7;
    c.second_prompt = 4;
    c.seed = unsigned(head_dim);
    check_prefill<float>(c, dms::dms_policy{{.window = 4}});
  }
  prefill_case c;
  c.tensor_cores = false;
  c.chunk = 16;
  check_prefill<dms::bfloat16>(c, dms::dms_policy{{.window = 16}});
  check_prefill<dms::half>(c, dms::dense_policy{});
}

TEST_CASE("GPU prefill == reference: Quest keeps its page key bounds", "[gpu][prefill][quest]") {
  for (const int chunk : {5, 1000}) {
    prefill_case c;
    c.page_size = 8;
    c.chunk = chunk;
    c.second_prompt = 11;
    c.seed = unsigned(chunk);
    check_prefill<dms::bfloat16>(c, dms::quest_policy{});
  }
}

TEST_CASE("GPU prefill: a chunk that cannot get its pages changes nothing",
          "[gpu][prefill][sanitize]") {
  dms::cache_config cfg;
  cfg.num_kv_heads = 2;
  cfg.group_size = 2;
  cfg.head_dim = 64;
  cfg.page_size = 16;
  cfg.max_sequences = 2;
  cfg.max_row_slots = 1024;
  cfg.max_pages = 5;  // 2 rows x 40 tokens need 6 pages
  dms::paged_cache<dms::bfloat16, dms::dense_policy> host(cfg);
  const std::vector<std::int32_t> seqs = {host.add_sequence()};
  dms::cuda::device_cache<dms::bfloat16, dms::dense_policy> dev(host);
  std::mt19937 rng(7);
  const prompts p = make_prompts<dms::bfloat16>(cfg, {40}, flags::none, rng);
  std::vector<float> out, lse;
  device_prefill(dev, seqs, p, 1000, true, true, out, lse);
  CHECK(dev.status() == dms::step_status::pool_exhausted);
  dms::cache_image<dms::bfloat16> expected = host.to_image();
  expected.status = std::int32_t(dms::step_status::pool_exhausted);
  CHECK(dms_test::first_difference(expected, dev.download()) == "");
}

// ---- training-free policies: prompt scores (prompt_scores.cuh) and compression -------------

TEST_CASE("GPU prefill == reference: TOVA keeps what the last prompt query attends to",
          "[gpu][prefill][tova]") {
  for (const int chunk : {1, 7, 1000}) {
    prefill_case c;
    c.chunk = chunk;
    c.second_prompt = 9;
    c.seed = unsigned(300 + chunk);
    check_prefill<dms::bfloat16>(c, dms::tova_policy{{.budget = 20}});
  }
  prefill_case c;
  c.group = 1;
  c.head_dim = 64;
  c.chunk = 16;
  check_prefill<dms::half>(c, dms::tova_policy{{.budget = 50}});  // one row under budget
}

TEST_CASE("GPU prefill == reference: H2O column sums, then heavy + recent", "[gpu][prefill][h2o]") {
  for (const int chunk : {7, 1000})
    for (const int recent : {0, 8}) {
      prefill_case c;
      c.chunk = chunk;
      c.second_prompt = 12;
      c.seed = unsigned(400 + chunk + recent);
      INFO("recent " << recent);
      check_prefill<dms::half>(c, dms::h2o_policy{{.budget = 24, .recent = recent}});
    }
  prefill_case c;  // many query batches per key tile, GQA 8
  c.kv_heads = 1;
  c.group = 8;
  c.lengths = {300, 251};
  c.chunk = 128;
  check_prefill<dms::bfloat16>(c, dms::h2o_policy{{.budget = 64, .recent = 16}});
}

TEST_CASE("GPU prefill == reference: SnapKV's window votes, max and average pooling",
          "[gpu][prefill][snapkv]") {
  for (const auto pooling : {dms::snapkv_pooling::max, dms::snapkv_pooling::avg})
    for (const int chunk : {5, 1000}) {
      prefill_case c;
      c.chunk = chunk;
      c.seed = unsigned(500 + chunk);
      check_prefill<dms::bfloat16>(
          c, dms::snapkv_policy{{.capacity = 24,
                                 .window = 6,
                                 .kernel = pooling == dms::snapkv_pooling::max ? 7 : 5,
                                 .pooling = pooling}});
    }
}

TEST_CASE("GPU prefill == reference: StreamingLLM keeps sinks + window, and the SIMT path",
          "[gpu][prefill][streaming]") {
  for (const int chunk : {3, 1000}) {
    prefill_case c;
    c.chunk = chunk;
    c.second_prompt = 20;
    c.seed = unsigned(600 + chunk);
    check_prefill<dms::bfloat16>(c, dms::streaming_llm_policy{{.sinks = 2, .recent = 10}});
  }
  prefill_case c;
  c.chunk = 9;
  c.head_dim = 64;
  check_prefill<float>(c, dms::tova_policy{{.budget = 16}});
  check_prefill<float>(c, dms::h2o_policy{{.budget = 16, .recent = 4}});
}

namespace {

// finish_prompts alone, on scores set by hand with many ties (0, 0.25, 0.5 and -0): the device
// must pick and compact exactly what paged_cache::finish_prompt does, bit for bit.
template <class P>
void check_finish_prompts(P policy, unsigned seed) {
  dms::cache_config cfg;
  cfg.num_kv_heads = 2;
  cfg.group_size = 2;
  cfg.head_dim = 64;
  cfg.page_size = 4;
  cfg.max_sequences = 5;
  cfg.max_row_slots = 256;
  cfg.max_pages = 200;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const std::vector<int> lengths = {37, 0, 1, 16, 90};
  dms::paged_cache<dms::bfloat16, P> host(cfg, policy);
  std::vector<std::int32_t> seqs;
  const std::size_t krow = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  for (const int n : lengths) {
    const int seq = host.add_sequence();
    seqs.push_back(seq);
    std::vector<float> k(krow), v(krow);
    for (int t = 0; t < n; ++t) {
      for (auto& x : k) x = uniform(rng);
      for (auto& x : v) x = uniform(rng);
      host.append(seq, k, v, {}, true);
    }
  }
  if (!host.to_image().score.empty()) {
    const auto view = host.view();
    const float choices[] = {0.0f, 0.25f, 0.5f, -0.0f};
    for (const int seq : seqs)
      for (int h = 0; h < cfg.num_kv_heads; ++h) {
        const int r = host.row_index(seq, h);
        for (int s = 0; s < host.row_length(r); ++s)
          view.score[view.slot_index(r, s)] = choices[rng() % 4];
      }
  }
  std::shuffle(seqs.begin(), seqs.end(), rng);
  dms::cuda::device_cache<dms::bfloat16, P> dev(host);
  for (const int seq : seqs) host.finish_prompt(seq);

  const auto d_seqs = upload(seqs);
  std::size_t bytes = 0;
  REQUIRE(dms::cuda::finish_prompts(nullptr, bytes, dev, d_seqs.data(), int(seqs.size())) ==
          cudaSuccess);
  dms::cuda::device_buffer<unsigned char> temp(std::max<std::size_t>(bytes, 1));
  REQUIRE(dms::cuda::finish_prompts(temp.data(), bytes, dev, d_seqs.data(), int(seqs.size())) ==
          cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  CHECK(dev.status() == dms::step_status::ok);
  REQUIRE(dms_test::first_difference(host.to_image(), dev.download()) == "");

  // A batch naming an unknown and a repeated sequence changes nothing but the status.
  const std::vector<std::int32_t> bad = {seqs[0], seqs[0]};
  const auto d_bad = upload(bad);
  REQUIRE(dms::cuda::finish_prompts(temp.data(), bytes, dev, d_bad.data(), 2) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  dms::cache_image<dms::bfloat16> expected = host.to_image();
  expected.status = std::int32_t(dms::step_status::duplicate_sequence);
  CHECK(dms_test::first_difference(expected, dev.download()) == "");
}

}  // namespace

// The subset bench/gpu_check/run.sh runs under compute-sanitizer: every prefill kernel once at
// small shapes (chunk plan/check/commit, tensor-core and SIMT attention over several key tiles,
// Quest bounds, the prompt scores of TOVA, H2O and SnapKV, finish_prompts, a failed chunk).
TEST_CASE("GPU prefill: small shapes for the sanitizers", "[gpu][prefill][sanitize]") {
  prefill_case c;
  c.second_prompt = 9;
  check_prefill<dms::bfloat16>(c, dms::dms_policy{{.window = 4}});
  c.lengths = {300, 251};
  c.chunk = 128;
  check_prefill<dms::bfloat16>(c, dms::dms_policy{{.window = 16}});
  prefill_case simt;
  simt.head_dim = 64;
  simt.second_prompt = 4;
  check_prefill<float>(simt, dms::dms_policy{{.window = 4}});
  simt.tensor_cores = false;
  check_prefill<dms::half>(simt, dms::dense_policy{});
  prefill_case q;
  q.page_size = 8;
  check_prefill<dms::bfloat16>(q, dms::quest_policy{});
  prefill_case f;
  f.decode_steps = 1;
  check_prefill<dms::bfloat16>(f, dms::tova_policy{{.budget = 20}});
  check_prefill<dms::half>(f, dms::h2o_policy{{.budget = 24, .recent = 8}});
  check_prefill<dms::bfloat16>(f, dms::snapkv_policy{{.capacity = 24, .window = 6}});
  check_prefill<dms::bfloat16>(f, dms::streaming_llm_policy{{.sinks = 2, .recent = 10}});
  check_finish_prompts(dms::h2o_policy{{.budget = 10, .recent = 3}}, 1);
}

TEST_CASE("GPU finish_prompts == paged_cache::finish_prompt, ties included",
          "[gpu][prefill][compression]") {
  for (const unsigned seed : {1u, 2u, 3u}) {
    check_finish_prompts(dms::tova_policy{{.budget = 9}}, seed);
    check_finish_prompts(dms::h2o_policy{{.budget = 10, .recent = 3}}, seed);
    check_finish_prompts(dms::h2o_policy{{.budget = 5, .recent = 0}}, seed);
    check_finish_prompts(
        dms::snapkv_policy{
            {.capacity = 12, .window = 3, .kernel = 7, .pooling = dms::snapkv_pooling::max}},
        seed);
    check_finish_prompts(
        dms::snapkv_policy{
            {.capacity = 12, .window = 3, .kernel = 5, .pooling = dms::snapkv_pooling::avg}},
        seed);
    check_finish_prompts(dms::streaming_llm_policy{{.sinks = 3, .recent = 5}}, seed);
    check_finish_prompts(dms::dense_policy{}, seed);
  }
}
