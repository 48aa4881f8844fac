// SPDX-License-Identifier: Apache-2.0
// dms::cuda::select_pages (Quest page selection on the device) against the CPU's
// quest_policy::select_pages. The device computes every bound with quest_rule::upper_bound in the
// CPU's order, so the page lists must be EXACTLY equal, ties included: identical keys, keys from
// three values, all-zero and small-integer queries. Rows cover every branch: empty, one token,
// page boundaries, n == budget, n == budget + 1, and thousands of pages (past the select kernel's
// shared-memory key cache); shapes cover G = 1, 3, 4, 8, 64, head_dim 64, 66, 128, 1024, and K/V
// in half, bfloat16 and float.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "dms/cuda/device_buffer.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/cuda/quest_select.cuh"
#include "dms/dms.hpp"

namespace {

template <class T>
using quest_cache = dms::paged_cache<T, dms::quest_policy>;
template <class T>
using device_quest_cache = dms::cuda::device_cache<T, dms::quest_policy>;

enum class keys_kind { random, identical, three_values };
enum class q_kind { random, zero, small_integers };

// One sequence per length; the pool holds exactly what they need.
dms::cache_config make_config(int kv_heads, int group_size, int head_dim, int page_size,
                              const std::vector<int>& lengths) {
  dms::cache_config c;
  c.num_kv_heads = kv_heads;
  c.group_size = group_size;
  c.head_dim = head_dim;
  c.page_size = page_size;
  int pages = 0, longest = 1;
  for (const int n : lengths) {
    pages += kv_heads * ((n + page_size - 1) / page_size);
    longest = std::max(longest, n);
  }
  c.max_pages = std::max(pages, 1);
  c.max_sequences = int(lengths.size());
  c.max_row_slots = longest + page_size;  // a row never fills its page table
  return c;
}

dms::quest_policy quest(int token_budget, int layer = 2, int dense_layers = 2) {
  return dms::quest_policy(dms::quest_params{token_budget, layer, dense_layers});
}

// Adds one sequence per length and appends that many tokens. Returns the batch: the sequence ids
// in reverse (so batch row != sequence id) plus the first one again (selection only reads).
template <class T>
std::vector<std::int32_t> fill(quest_cache<T>& cache, const std::vector<int>& lengths,
                               keys_kind kind, std::mt19937& rng) {
  const auto& cfg = cache.config();
  const auto n = std::size_t(cfg.num_kv_heads) * cfg.head_dim;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> three(-1, 1);
  std::vector<std::int32_t> seqs;
  std::vector<float> k(n), v(n, 0.5f), fixed(n);
  for (const int length : lengths) {
    const int seq = cache.add_sequence();
    seqs.push_back(seq);
    for (auto& x : fixed) x = normal(rng);
    for (int t = 0; t < length; ++t) {
      for (std::size_t c = 0; c < n; ++c)
        k[c] = kind == keys_kind::random      ? normal(rng)
               : kind == keys_kind::identical ? fixed[c]
                                              : float(three(rng));
      cache.append(seq, k, v);
    }
  }
  std::reverse(seqs.begin(), seqs.end());
  seqs.push_back(seqs.back());
  return seqs;
}

// Queries [batch][H * G][d], drawn as floats and rounded through Q; q_float is what the CPU sees.
template <class Q>
void make_queries(q_kind kind, std::size_t count, std::mt19937& rng, std::vector<Q>& q,
                  std::vector<float>& q_float) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(-2, 2);
  q.resize(count);
  q_float.resize(count);
  for (std::size_t j = 0; j < count; ++j) {
    const float x = kind == q_kind::random ? normal(rng)
                    : kind == q_kind::zero ? 0.0f
                                           : float(small(rng));
    q[j] = dms::from_float<Q>(x);
    q_float[j] = dms::to_float(q[j]);
  }
}

// Device pages/page_counts of one call against the CPU's selection for every batch row.
template <class T>
void require_same_as_cpu(quest_cache<T>& host, const std::vector<std::int32_t>& seqs,
                         const std::vector<float>& q_float, const std::vector<std::int32_t>& pages,
                         const std::vector<std::int32_t>& counts, int stride) {
  const auto& cfg = host.config();
  const int H = cfg.num_kv_heads, G = cfg.group_size, d = cfg.head_dim;
  std::vector<int> expected;
  for (std::size_t b = 0; b < seqs.size(); ++b)
    for (int h = 0; h < H; ++h) {
      const std::size_t r = b * H + h;
      auto row = host.row(seqs[b], h);
      host.policy().select_pages(row, q_float.data() + r * G * d, G, d, expected);
      const std::vector<int> got(
          pages.begin() + std::ptrdiff_t(r * stride),
          pages.begin() + std::ptrdiff_t(r * stride) + std::clamp(counts[r], 0, stride));
      CAPTURE(b, seqs[b], h, row.length(), row.num_pages(), counts[r]);
      REQUIRE(counts[r] == int(expected.size()));
      REQUIRE(got == expected);
    }
}

// Uploads the host cache, then for each query kind: select on the device, compare with the CPU.
template <class T, class Q>
void check_against_cpu(quest_cache<T>& host, const std::vector<std::int32_t>& seqs,
                       std::mt19937& rng) {
  const auto& cfg = host.config();
  const device_quest_cache<T> dev(host);
  const auto policy = dev.device_policy();
  const int batch = int(seqs.size()), rows = batch * cfg.num_kv_heads;
  const int stride = dms::cuda::select_pages_stride(cfg, policy);
  const auto q_count = std::size_t(rows) * cfg.group_size * cfg.head_dim;

  dms::cuda::device_buffer<std::int32_t> d_seqs(seqs.size()), d_pages{std::size_t(rows) * stride},
      d_counts{std::size_t(rows)};
  dms::cuda::device_buffer<Q> d_q(q_count);
  d_seqs.upload(seqs, nullptr);
  std::size_t temp_bytes = 0;
  REQUIRE(dms::cuda::select_pages<T, Q>(nullptr, temp_bytes, dev.view().read_only(), nullptr, batch,
                                        nullptr, policy, nullptr, nullptr, stride) == cudaSuccess);
  dms::cuda::device_buffer<unsigned char> temp(std::max<std::size_t>(temp_bytes, 1));

  std::vector<Q> q;
  std::vector<float> q_float;
  std::vector<std::int32_t> pages, counts;
  for (const q_kind kind : {q_kind::random, q_kind::zero, q_kind::small_integers, q_kind::random}) {
    CAPTURE(int(kind));
    make_queries(kind, q_count, rng, q, q_float);
    d_q.upload(q, nullptr);
    REQUIRE(dms::cuda::select_pages(temp.data(), temp_bytes, dev.view().read_only(), d_seqs.data(),
                                    batch, d_q.data(), policy, d_pages.data(), d_counts.data(),
                                    stride) == cudaSuccess);
    d_pages.download(pages, nullptr);
    d_counts.download(counts, nullptr);
    require_same_as_cpu(host, seqs, q_float, pages, counts, stride);
  }
}

// Every branch of the selection for a page budget of `budget_pages`.
std::vector<int> lengths_around(int budget_pages, int P, std::vector<int> long_rows) {
  std::vector<int> l{0,
                     1,
                     P - 1,
                     P,
                     P + 1,
                     (budget_pages - 1) * P + 1,
                     budget_pages * P,
                     budget_pages * P + 1,
                     budget_pages * P + P + 1};
  l.insert(l.end(), long_rows.begin(), long_rows.end());
  return l;
}

template <class T, class Q>
void run_case(int H, int G, int d, int P, int token_budget, const std::vector<int>& lengths,
              keys_kind kind, unsigned seed) {
  CAPTURE(H, G, d, P, token_budget, int(kind));
  std::mt19937 rng(seed);
  quest_cache<T> host(make_config(H, G, d, P, lengths), quest(token_budget));
  const auto seqs = fill(host, lengths, kind, rng);
  check_against_cpu<T, Q>(host, seqs, rng);
}

}  // namespace

TEST_CASE("cuda::select_pages equals the CPU: half K/V, half q, G = 4, head_dim 128",
          "[gpu][quest]") {
  const int token_budget = GENERATE(16, 64, 1000, 4096);  // 1 (only the current page), 4, 62, 256
  const int P = 16, pages = std::max(1, token_budget / P);
  run_case<dms::half, dms::half>(2, 4, 128, P, token_budget, lengths_around(pages, P, {3000, 5000}),
                                 keys_kind::random, 11);
}

TEST_CASE("cuda::select_pages equals the CPU: bfloat16 K/V, float q, G = 8, head_dim 64",
          "[gpu][quest]") {
  const int token_budget = GENERATE(32, 512);
  const int P = 16, pages = token_budget / P;
  run_case<dms::bfloat16, float>(2, 8, 64, P, token_budget, lengths_around(pages, P, {2500, 4000}),
                                 keys_kind::random, 12);
}

TEST_CASE("cuda::select_pages equals the CPU: float K/V, bfloat16 q, G = 1, rows of 4000+ pages",
          "[gpu][quest]") {
  // Page size 4: 16381, 16385 and 17000 tokens are 4095, 4096 and 4249 scored pages, around the
  // select kernel's shared-memory key cache (quest_select_tuning::cached_keys).
  static_assert(dms::cuda::quest_select_tuning::cached_keys == 4096);
  const int token_budget = GENERATE(16, 12000);  // 4 and 3000 pages
  const int P = 4;
  run_case<float, dms::bfloat16>(2, 1, 128, P, token_budget,
                                 lengths_around(token_budget / P, P, {16381, 16385, 17000}),
                                 keys_kind::random, 13);
}

TEST_CASE("cuda::select_pages breaks ties exactly like the CPU", "[gpu][quest]") {
  // Identical keys: every page has the same bounds, so every score ties. Keys from {-1, 0, 1}:
  // most pages share bounds. Zero and small-integer queries make exact ties certain.
  const auto kind = GENERATE(keys_kind::identical, keys_kind::three_values);
  const int token_budget = GENERATE(64, 1000);
  const int P = 16;
  run_case<dms::half, dms::half>(2, 4, 128, P, token_budget,
                                 lengths_around(std::max(1, token_budget / P), P, {2000}), kind,
                                 14);
}

TEST_CASE("cuda::select_pages equals the CPU for unusual shapes", "[gpu][quest]") {
  // G * head_dim too big for q to stay resident (heads in chunks; few pages per tile), a
  // head_dim that is not a multiple of 4 (scalar loads), and a small page size.
  struct shape {
    int H, G, d, P;
  };
  const auto s = GENERATE(shape{2, 8, 1024, 16}, shape{1, 64, 128, 16}, shape{3, 3, 66, 8},
                          shape{2, 4, 128, 1});
  const int token_budget = 64;
  const auto kind = GENERATE(keys_kind::random, keys_kind::three_values);
  run_case<dms::half, dms::half>(s.H, s.G, s.d, s.P, token_budget,
                                 lengths_around(token_budget / s.P, s.P, {600, 1200}), kind, 15);
}

// The subset bench/gpu_check/run.sh runs under compute-sanitizer: the select kernels at small
// shapes, rows past the shared-memory key cache, and q in head chunks (G * head_dim too large).
TEST_CASE("cuda::select_pages: small shapes for the sanitizers", "[gpu][quest][sanitize]") {
  run_case<dms::half, dms::half>(2, 4, 128, 16, 64, lengths_around(4, 16, {600}), keys_kind::random,
                                 31);
  run_case<float, dms::bfloat16>(1, 1, 128, 4, 16, lengths_around(4, 4, {16385}), keys_kind::random,
                                 32);
  run_case<dms::half, dms::half>(2, 8, 1024, 16, 64, lengths_around(4, 16, {300}),
                                 keys_kind::three_values, 33);
}

TEST_CASE("cuda::select_pages reads every page of a dense layer or an unreachable budget",
          "[gpu][quest]") {
  const int P = 16;
  const std::vector<int> lengths{0, 1, 16, 17, 100, 2000};
  std::mt19937 rng(16);
  SECTION("a layer below dense_layers") {
    quest_cache<dms::half> host(make_config(2, 4, 128, P, lengths), quest(64, 0, 2));
    const auto seqs = fill(host, lengths, keys_kind::random, rng);
    REQUIRE(dms::cuda::select_pages_stride(host.config(), host.policy().device_form()) ==
            host.config().max_pages_per_row());
    check_against_cpu<dms::half, dms::half>(host, seqs, rng);
  }
  SECTION("a budget of more pages than a row can hold") {
    quest_cache<dms::half> host(make_config(2, 4, 128, P, lengths), quest(1 << 20));
    const auto seqs = fill(host, lengths, keys_kind::random, rng);
    check_against_cpu<dms::half, dms::half>(host, seqs, rng);
  }
}

TEST_CASE("cuda::select_pages: argument checks, writable views, bad ids, graph capture",
          "[gpu][quest]") {
  using T = dms::half;
  const int P = 16, token_budget = 64;
  const std::vector<int> lengths{0, 5, 64, 65, 900};
  std::mt19937 rng(17);
  quest_cache<T> host(make_config(2, 4, 128, P, lengths), quest(token_budget));
  auto seqs = fill(host, lengths, keys_kind::random, rng);
  const device_quest_cache<T> dev(host);
  const auto& cfg = host.config();
  const auto policy = dev.device_policy();
  const int batch = int(seqs.size()), rows = batch * cfg.num_kv_heads;
  const int stride = dms::cuda::select_pages_stride(cfg, policy);
  REQUIRE(stride == token_budget / P);
  const auto q_count = std::size_t(rows) * cfg.group_size * cfg.head_dim;

  dms::cuda::device_buffer<std::int32_t> d_seqs(seqs.size()), d_pages{std::size_t(rows) * stride},
      d_counts{std::size_t(rows)};
  dms::cuda::device_buffer<T> d_q(q_count);
  std::size_t temp_bytes = 0;
  REQUIRE(dms::cuda::select_pages(nullptr, temp_bytes, dev.view(), nullptr, batch,
                                  static_cast<const T*>(nullptr), policy, nullptr, nullptr,
                                  stride) == cudaSuccess);
  REQUIRE(temp_bytes >= sizeof(std::uint32_t) * std::size_t(rows) * cfg.max_pages_per_row());
  dms::cuda::device_buffer<unsigned char> temp(temp_bytes);

  std::vector<T> q;
  std::vector<float> q_float;
  std::vector<std::int32_t> pages, counts;
  make_queries(q_kind::random, q_count, rng, q, q_float);
  d_q.upload(q, nullptr);

  SECTION("invalid arguments are rejected before any launch") {
    std::size_t too_small = temp_bytes - 1;
    CHECK(dms::cuda::select_pages(temp.data(), too_small, dev.view(), d_seqs.data(), batch,
                                  d_q.data(), policy, d_pages.data(), d_counts.data(),
                                  stride) == cudaErrorInvalidValue);
    CHECK(dms::cuda::select_pages(temp.data(), temp_bytes, dev.view(), d_seqs.data(), batch,
                                  d_q.data(), policy, d_pages.data(), d_counts.data(),
                                  stride - 1) == cudaErrorInvalidValue);
    CHECK(dms::cuda::select_pages(temp.data(), temp_bytes, dev.view(), d_seqs.data(), -1,
                                  d_q.data(), policy, d_pages.data(), d_counts.data(),
                                  stride) == cudaErrorInvalidValue);
    CHECK(dms::cuda::select_pages(temp.data(), temp_bytes, dev.view(), d_seqs.data(), batch,
                                  static_cast<const T*>(nullptr), policy, d_pages.data(),
                                  d_counts.data(), stride) == cudaErrorInvalidValue);
    CHECK(dms::cuda::select_pages(temp.data(), temp_bytes, dev.view(), d_seqs.data(), 0, d_q.data(),
                                  policy, d_pages.data(), d_counts.data(), stride) == cudaSuccess);
    CHECK(cudaGetLastError() == cudaSuccess);
  }

  SECTION("a writable view and an out-of-range sequence id (no pages)") {
    seqs.push_back(cfg.max_sequences);
    seqs.push_back(-1);
    const int batch2 = int(seqs.size()), rows2 = batch2 * cfg.num_kv_heads;
    dms::cuda::device_buffer<std::int32_t> d_seqs2(seqs.size()),
        d_pages2{std::size_t(rows2) * stride}, d_counts2{std::size_t(rows2)};
    dms::cuda::device_buffer<T> d_q2{std::size_t(rows2) * cfg.group_size * cfg.head_dim};
    make_queries(q_kind::random, d_q2.size(), rng, q, q_float);
    d_q2.upload(q, nullptr);
    d_seqs2.upload(seqs, nullptr);
    std::size_t bytes2 = 0;
    REQUIRE(dms::cuda::select_pages(nullptr, bytes2, dev.view(), d_seqs2.data(), batch2,
                                    d_q2.data(), policy, d_pages2.data(), d_counts2.data(),
                                    stride) == cudaSuccess);
    dms::cuda::device_buffer<unsigned char> temp2(bytes2);
    REQUIRE(dms::cuda::select_pages(temp2.data(), bytes2, dev.view(), d_seqs2.data(), batch2,
                                    d_q2.data(), policy, d_pages2.data(), d_counts2.data(),
                                    stride) == cudaSuccess);
    d_pages2.download(pages, nullptr);
    d_counts2.download(counts, nullptr);
    for (int r = rows; r < rows2; ++r) REQUIRE(counts[r] == 0);
    seqs.resize(seqs.size() - 2);
    pages.resize(std::size_t(rows) * stride);
    counts.resize(std::size_t(rows));
    q_float.resize(q_count);
    require_same_as_cpu(host, seqs, q_float, pages, counts, stride);
  }

  SECTION("captured in a CUDA graph and replayed with new queries") {
    d_seqs.upload(seqs, nullptr);
    cudaStream_t stream = nullptr;
    REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess);
    const cudaError_t launched = dms::cuda::select_pages(
        temp.data(), temp_bytes, dev.view().read_only(), d_seqs.data(), batch, d_q.data(), policy,
        d_pages.data(), d_counts.data(), stride, stream);
    REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
    REQUIRE(launched == cudaSuccess);
    REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
    for (int replay = 0; replay < 3; ++replay) {
      make_queries(replay == 1 ? q_kind::small_integers : q_kind::random, q_count, rng, q, q_float);
      REQUIRE(cudaMemcpyAsync(d_q.data(), q.data(), q.size() * sizeof(T), cudaMemcpyHostToDevice,
                              stream) == cudaSuccess);
      REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
      REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
      d_pages.download(pages, nullptr);
      d_counts.download(counts, nullptr);
      require_same_as_cpu(host, seqs, q_float, pages, counts, stride);
    }
    CHECK(cudaGraphExecDestroy(exec) == cudaSuccess);
    CHECK(cudaGraphDestroy(graph) == cudaSuccess);
    CHECK(cudaStreamDestroy(stream) == cudaSuccess);
  }
}
