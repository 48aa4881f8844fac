// SPDX-License-Identifier: Apache-2.0
//
// dms_bench_cpu, the CPU fast path (dms::cpu), against the same-run read rooflines measured by
// main() in cpu_decode.cpp (cpu_roofline.hpp). One attention layer of 8 KV heads x G = 4
// (32 query heads), head_dim 128, page 16, K/V stored as bf16 or f32.
//
//   decode_fast/<kv>/<policy>/threads:N/batch:B/context:C
//       dms::cpu::decode_attention (the batched entry: the whole batch is one parallel job) for
//       one decode step of B sequences with C tokens appended to every row, on a thread pool of
//       N threads. Policies:
//         dense   every token is live and read;
//         dms8x   DMS with window 512; past the window, tokens survive with the probability that
//                 makes a row hold C / 8 tokens (8x compression; at 4K a row cannot hold fewer
//                 than the window's 513, so 4K reaches 7.98x);
//         quest   Quest at a non-dense layer (layer 2), token budget C / 8;
//         tova    TOVA with budget C (nothing evicted): attention over all C tokens plus the
//                 score fold of every slot, to be read against dense at the same shape.
//       Counters: kv_bytes_per_step (slots read, from the cache's own counter, x head_dim x 2 x
//       sizeof(storage)), bytes_per_second, frac_of_1core_read_roofline and
//       frac_of_2core_read_roofline (bytes_per_second over the same-run rooflines),
//       tokens_per_s, slots_read_per_row, compression.
//   paged_read/<kv>/threads:N/batch:B/context:C
//       The ceiling the paged layout leaves the decode kernel: the K and V pages of the same dense
//       cache as decode_fast/<kv>/dense at that shape, cut into the same split-K items, run on
//       the same pool, with nothing computed but a sum of their 32-bit words. Its
//       bytes_per_second against decode_fast's separates what the scattered pages cost from
//       what the kernel costs. Counters as decode_fast's (kv_bytes_per_step, bytes_per_second,
//       frac_of_*_read_roofline).
//   page_size/<kv>/{decode,read}/threads:2/batch:B/context:16384/page:P
//       decode_fast/<kv>/dense and paged_read at page sizes P = 16, 64, 256 (batch 1 and 4):
//       what the granularity of the layout costs the kernel and the plain read.
//   adjacent/decode_fast/<kv>/{dense,dms8x}/..., adjacent/paged_read/<kv>/...
//       The same over a cache with dms::page_placement::adjacent (each row's pages in runs
//       rather than interleaved with the other rows'): two threads at batch 1/4/16, and one
//       thread at batch 1 (as decode_fast's dense rows), context 4K/16K/64K.
//   in_cache/decode_fast/<kv>/dense/threads:N/batch:1/context:C
//       The dense decode (adjacent pages) at C = 512 and 1024, whose K/V (2-8 MB) stay in the
//       L2 or L3 between steps: the rate the kernel's arithmetic allows, the ceiling for the
//       rows from memory. Counters as decode_fast's (the roofline fractions may exceed 1).
//   prefill_fast/<kv>/<policy>/tokens:T
//       dms::cpu::prefill of a whole T-token prompt in one chunk into an empty sequence, on the
//       default thread pool: the attention, the prompt scores, the appends and compress_prompt.
//       Policies: dense; dms (window 512, 7 of 8 tokens flagged); tova and h2o (budget T / 8:
//       prompt scores over the last query / every causal pair, then the prompt's reduction).
//       Counters: causal_gflops (4 x 32 heads x 128 x T (T + 1) / 2 flops of dense causal
//       attention over wall time, the same yardstick for every policy), tokens_per_s.
//
// Caches are built once per shape, outside the timed loop, from a pool of distinct token vectors
// (building 16 x 64K-token rows from fresh random numbers would take longer than measuring them).
// A shape whose K/V would exceed DMS_BENCH_MAX_KV_GB (default 10) is skipped with a message.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cpu_roofline.hpp"
#include "dms/cpu.hpp"
#include "dms/dms.hpp"
#include "hash_uniform.hpp"

namespace {

constexpr int kv_heads = 8;
constexpr int group_size = 4;
constexpr int head_dim = 128;
constexpr int page_size = 16;
constexpr int dms_window = 512;
constexpr int token_pool = 509;  // distinct token vectors, cycled

using dms_bench::hash_uniform;

double max_kv_bytes() {
  const char* env = std::getenv("DMS_BENCH_MAX_KV_GB");
  return (env ? std::atof(env) : 10.0) * 1e9;
}

/// [token_pool][kv_heads][head_dim] keys, then values.
const std::vector<float>& token_vectors() {
  static const std::vector<float> v = [] {
    std::vector<float> x(std::size_t(token_pool) * 2 * kv_heads * head_dim);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = hash_uniform(i);
    return x;
  }();
  return v;
}

dms::cpu::thread_pool& pool(int threads) {
  static dms::cpu::thread_pool one(1), two(2);
  return threads == 1 ? one : two;
}

// ---- decode ----------------------------------------------------------------------------------

struct fixture_base {
  virtual ~fixture_base() = default;
};

template <class T, class P>
struct decode_fixture final : fixture_base {
  decode_fixture(const dms::cache_config& cfg, P policy, dms::page_placement placement)
      : cache(cfg, std::move(policy), placement) {}
  dms::paged_cache<T, P> cache;
  std::vector<int> seqs;
  std::vector<float> q, out;
};

struct fixture_slot {
  std::string key;
  std::unique_ptr<fixture_base> fixture;
};
fixture_slot& current_fixture() {
  static fixture_slot slot;
  return slot;
}

/// The DMS logit carried by token t (it decides token t-1): past the window, token p survives
/// with probability keep, so a row of `context` tokens holds about context / 8.
float dms8x_logit(std::int64_t t, int context) {
  const double keep =
      std::max(0.0, (context / 8.0 - (dms_window + 1)) / double(context - (dms_window + 1)));
  if (t < 1) return -1.0f;
  return 0.5 * (hash_uniform(std::uint64_t(t - 1) * 7919 + 13) + 1.0f) < keep ? -1.0f : 1.0f;
}

template <class T, class P>
std::unique_ptr<decode_fixture<T, P>> build_decode(int batch, int context, const P& policy, int ps,
                                                   dms::page_placement placement) {
  // Room for context + 1 tokens: TOVA with budget = context holds budget + 1 before it evicts.
  const int pages_per_row = context / ps + 1;
  dms::cache_config cfg;
  cfg.num_kv_heads = kv_heads;
  cfg.group_size = group_size;
  cfg.head_dim = head_dim;
  cfg.page_size = ps;
  cfg.max_sequences = batch;
  cfg.max_row_slots = pages_per_row * ps;
  cfg.max_pages = batch * kv_heads * pages_per_row;
  auto fx = std::make_unique<decode_fixture<T, P>>(cfg, policy, placement);
  const std::size_t kn = std::size_t(kv_heads) * head_dim;
  const auto& tv = token_vectors();
  std::vector<float> logits(kv_heads);
  for (int s = 0; s < batch; ++s) fx->seqs.push_back(fx->cache.add_sequence());
  for (int t = 0; t < context; ++t) {  // token-major: the sequences' pages interleave
    std::fill(logits.begin(), logits.end(), dms8x_logit(t, context));
    for (int s = 0; s < batch; ++s) {
      const std::size_t at = std::size_t((t * 31 + s * 7) % token_pool) * 2 * kn;
      fx->cache.append(fx->seqs[std::size_t(s)], std::span<const float>(tv).subspan(at, kn),
                       std::span<const float>(tv).subspan(at + kn, kn), logits);
    }
  }
  const std::size_t qn = std::size_t(kv_heads) * group_size * head_dim;
  fx->q.resize(std::size_t(batch) * qn);
  for (std::size_t i = 0; i < fx->q.size(); ++i) fx->q[i] = hash_uniform(~std::uint64_t{0} - i);
  fx->out.assign(fx->q.size(), 0.0f);
  return fx;
}

/// The cache of benchmark `name` at this shape, built on first use; one cache is alive at a time.
template <class T, class P>
decode_fixture<T, P>& decode_fixture_for(const std::string& name, int batch, int context,
                                         const P& policy, int ps, dms::page_placement placement) {
  const std::string key = name + "/" + std::to_string(batch) + "/" + std::to_string(context) + "/" +
                          std::to_string(ps) + "/" + dms::page_placement_name(placement);
  auto& slot = current_fixture();
  if (slot.key != key) {
    slot.fixture.reset();  // free the old cache before building the next
    slot.key.clear();
    slot.fixture = build_decode<T, P>(batch, context, policy, ps, placement);
    slot.key = key;
  }
  return static_cast<decode_fixture<T, P>&>(*slot.fixture);
}

template <class T, class P>
void bm_decode_fast(benchmark::State& state, const std::string& name, P policy, int ps = page_size,
                    dms::page_placement placement = dms::page_placement::stack) {
  const int threads = int(state.range(0)), batch = int(state.range(1));
  const int context = int(state.range(2));
  const double full_kv = double(batch) * kv_heads * context * head_dim * 2.0 * sizeof(T);
  if (full_kv > max_kv_bytes()) {
    state.SkipWithError("K/V above DMS_BENCH_MAX_KV_GB");
    return;
  }
  auto& fx = decode_fixture_for<T>(name, batch, context, policy, ps, placement);
  dms::cpu::executor& exec = pool(threads);
  const std::span<const int> seqs(fx.seqs);
  dms::cpu::decode_attention(fx.cache, seqs, fx.q, fx.out, {}, exec);  // warm the workspace

  const std::int64_t reads_before = fx.cache.stats().kv_token_reads;
  const auto started = std::chrono::steady_clock::now();
  for (auto _ : state) {
    dms::cpu::decode_attention(fx.cache, seqs, fx.q, fx.out, {}, exec);
    benchmark::DoNotOptimize(fx.out.data());
    benchmark::ClobberMemory();
  }
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - started;
  const dms::cache_stats st = fx.cache.stats();
  const double iterations = double(state.iterations());
  const double rows = double(batch) * kv_heads;
  const double slots_read = double(st.kv_token_reads - reads_before);
  const double kv_bytes = slots_read * head_dim * 2.0 * double(sizeof(T));
  const double bytes_per_s = kv_bytes / elapsed.count();
  state.SetBytesProcessed(std::int64_t(kv_bytes));
  state.counters["kv_bytes_per_step"] = kv_bytes / iterations;
  state.counters["tokens_per_s"] =
      benchmark::Counter(iterations * batch, benchmark::Counter::kIsRate);
  state.counters["frac_of_1core_read_roofline"] = bytes_per_s / dms_bench::one_core_read_roofline;
  state.counters["frac_of_2core_read_roofline"] = bytes_per_s / dms_bench::two_core_read_roofline;
  state.counters["slots_read_per_row"] = slots_read / iterations / rows;
  state.counters["compression"] = st.compression_ratio;
}

template <class T>
void register_decode_fast(const std::string& kv) {
  const auto shapes = [](benchmark::internal::Benchmark* b, bool one_thread_too) {
    b->ArgNames({"threads", "batch", "context"});
    if (one_thread_too) b->ArgsProduct({{1}, {1}, {4096, 16384, 65536}});
    b->ArgsProduct({{2}, {1, 4, 16}, {4096, 16384, 65536}})
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  };
  const auto add = [&](const std::string& policy, bool one_thread_too, auto make) {
    const std::string name = "decode_fast/" + kv + "/" + policy;
    shapes(benchmark::RegisterBenchmark(name.c_str(),
                                        [name, make](benchmark::State& s) {
                                          bm_decode_fast<T>(s, name, make(int(s.range(2))));
                                        }),
           one_thread_too);
  };
  add("dense", true, [](int) { return dms::dense_policy{}; });
  add("dms8x", false, [](int) { return dms::dms_policy{{.window = dms_window}}; });
  add("quest", false, [](int c) { return dms::quest_policy{{.token_budget = c / 8, .layer = 2}}; });
  add("tova", false, [](int c) { return dms::tova_policy{{.budget = c}}; });
}

// ---- paged read ------------------------------------------------------------------------------

/// Sum of n 32-bit words with 32 independent accumulators (vectorized by the compiler, like the
/// roofline's read_sum; integers, so no value the bits happen to spell can slow the adds).
std::uint32_t read_words(const std::uint32_t* p, std::size_t n) {
  constexpr std::size_t lanes = 32;
  std::uint32_t acc[lanes] = {};
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes)
    for (std::size_t j = 0; j < lanes; ++j) acc[j] += p[i + j];
  for (; i < n; ++i) acc[0] += p[i];
  std::uint32_t sum = 0;
  for (const std::uint32_t a : acc) sum += a;
  return sum;
}

template <class T>
void bm_paged_read(benchmark::State& state, const std::string& kv, int ps = page_size,
                   dms::page_placement placement = dms::page_placement::stack) {
  using P = dms::dense_policy;
  const int threads = int(state.range(0)), batch = int(state.range(1));
  const int context = int(state.range(2));
  const double full_kv = double(batch) * kv_heads * context * head_dim * 2.0 * sizeof(T);
  if (full_kv > max_kv_bytes()) {
    state.SkipWithError("K/V above DMS_BENCH_MAX_KV_GB");
    return;
  }
  // The dense decode benchmark's cache (shared with it when they run back to back).
  auto& fx =
      decode_fixture_for<T>("decode_fast/" + kv + "/dense", batch, context, P{}, ps, placement);
  const auto view = fx.cache.view();

  struct item {
    int row, first_page, num_pages;
  };
  std::vector<item> items;
  const int chunk_pages = dms::cpu::detail::decode_chunk_pages(ps);
  double kv_bytes = 0.0;
  for (const int seq : fx.seqs)
    for (int h = 0; h < kv_heads; ++h) {
      const int row = seq * kv_heads + h;
      const int pages = view.num_pages(row);
      for (int p0 = 0; p0 < pages; p0 += chunk_pages)
        items.push_back({row, p0, std::min(chunk_pages, pages - p0)});
      kv_bytes += double(view.length(row)) * head_dim * 2.0 * sizeof(T);
    }
  std::vector<std::uint32_t> sums(items.size());
  const auto read_item = [&](std::size_t i) {
    const item& it = items[i];
    std::uint32_t sum = 0;
    for (int lp = it.first_page; lp < it.first_page + it.num_pages; ++lp) {
      const std::int64_t base = std::int64_t(view.page(it.row, lp)) * ps;
      const int count = std::min(ps, view.length(it.row) - lp * ps);
      const std::size_t words = std::size_t(count) * head_dim * sizeof(T) / 4;
      sum += read_words(reinterpret_cast<const std::uint32_t*>(view.k + base * head_dim), words);
      sum += read_words(reinterpret_cast<const std::uint32_t*>(view.v + base * head_dim), words);
    }
    sums[i] = sum;
  };
  dms::cpu::executor& exec = pool(threads);
  exec.parallel_for(items.size(), dms::cpu::task_ref(read_item));  // warm the pool
  const auto started = std::chrono::steady_clock::now();
  for (auto _ : state) {
    exec.parallel_for(items.size(), dms::cpu::task_ref(read_item));
    benchmark::DoNotOptimize(sums.data());
    benchmark::ClobberMemory();
  }
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - started;
  const double bytes_per_s = kv_bytes * double(state.iterations()) / elapsed.count();
  state.SetBytesProcessed(std::int64_t(kv_bytes * double(state.iterations())));
  state.counters["kv_bytes_per_step"] = kv_bytes;
  state.counters["frac_of_1core_read_roofline"] = bytes_per_s / dms_bench::one_core_read_roofline;
  state.counters["frac_of_2core_read_roofline"] = bytes_per_s / dms_bench::two_core_read_roofline;
}

template <class T>
void register_paged_read(const std::string& kv) {
  const std::string name = "paged_read/" + kv;
  benchmark::RegisterBenchmark(name.c_str(), [kv](benchmark::State& s) { bm_paged_read<T>(s, kv); })
      ->ArgNames({"threads", "batch", "context"})
      ->ArgsProduct({{1}, {1}, {4096, 16384, 65536}})
      ->ArgsProduct({{2}, {1, 4, 16}, {4096, 16384, 65536}})
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}

/// page_size/<kv>/{decode,read}/threads:2/batch:B/context:16K/page:P: dense decode_fast and
/// paged_read at page sizes 16, 64 and 256, what the layout's granularity costs each.
template <class T>
void register_page_size(const std::string& kv) {
  const auto shapes = [](benchmark::internal::Benchmark* b) {
    b->ArgNames({"threads", "batch", "context", "page"})
        ->ArgsProduct({{2}, {1, 4}, {16384}, {16, 64, 256}})
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  };
  const std::string decode = "page_size/" + kv + "/decode";
  shapes(benchmark::RegisterBenchmark(decode.c_str(), [kv](benchmark::State& s) {
    bm_decode_fast<T>(s, "decode_fast/" + kv + "/dense", dms::dense_policy{}, int(s.range(3)));
  }));
  const std::string read = "page_size/" + kv + "/read";
  shapes(benchmark::RegisterBenchmark(
      read.c_str(), [kv](benchmark::State& s) { bm_paged_read<T>(s, kv, int(s.range(3))); }));
}

/// adjacent/{decode_fast/<kv>/{dense,dms8x},paged_read/<kv>}/threads:N/batch:B/context:C: the
/// same benchmarks over a cache with page_placement::adjacent, where each row's pages form runs.
template <class T>
void register_adjacent(const std::string& kv) {
  const auto shapes = [](benchmark::internal::Benchmark* b) {
    b->ArgNames({"threads", "batch", "context"})
        ->ArgsProduct({{1}, {1}, {4096, 16384, 65536}})
        ->ArgsProduct({{2}, {1, 4, 16}, {4096, 16384, 65536}})
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  };
  constexpr auto adjacent = dms::page_placement::adjacent;
  // Fixture names as decode_fast's (the cache key adds the placement), so that the dense decode
  // and the plain read share one cache when they alternate.
  const std::string dense = "decode_fast/" + kv + "/dense";
  shapes(benchmark::RegisterBenchmark(("adjacent/" + dense).c_str(), [dense](benchmark::State& s) {
    bm_decode_fast<T>(s, dense, dms::dense_policy{}, page_size, adjacent);
  }));
  const std::string dms8x = "decode_fast/" + kv + "/dms8x";
  shapes(benchmark::RegisterBenchmark(("adjacent/" + dms8x).c_str(), [dms8x](benchmark::State& s) {
    bm_decode_fast<T>(s, dms8x, dms::dms_policy{{.window = dms_window}}, page_size, adjacent);
  }));
  const std::string read = "adjacent/paged_read/" + kv;
  shapes(benchmark::RegisterBenchmark(
      read.c_str(), [kv](benchmark::State& s) { bm_paged_read<T>(s, kv, page_size, adjacent); }));
}

/// in_cache/decode_fast/<kv>/dense/threads:N/batch:1/context:C: the dense decode over K/V small
/// enough to stay in cache, what the kernel does when memory is not the limit.
template <class T>
void register_in_cache(const std::string& kv) {
  const std::string dense = "decode_fast/" + kv + "/dense";
  benchmark::RegisterBenchmark(("in_cache/" + dense).c_str(),
                               [dense](benchmark::State& s) {
                                 bm_decode_fast<T>(s, dense, dms::dense_policy{}, page_size,
                                                   dms::page_placement::adjacent);
                               })
      ->ArgNames({"threads", "batch", "context"})
      ->ArgsProduct({{1, 2}, {1}, {512, 1024}})
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}

// ---- prefill ---------------------------------------------------------------------------------

struct prompt {
  std::vector<float> q, k, v, logits;
};

const prompt& prompt_for(int tokens) {
  static int cached = -1;
  static prompt p;
  if (cached != tokens) {
    const std::size_t qn = std::size_t(kv_heads) * group_size * head_dim;
    const std::size_t kn = std::size_t(kv_heads) * head_dim;
    p.q.resize(std::size_t(tokens) * qn);
    p.k.resize(std::size_t(tokens) * kn);
    p.v.resize(std::size_t(tokens) * kn);
    p.logits.resize(std::size_t(tokens) * kv_heads);
    for (std::size_t i = 0; i < p.q.size(); ++i) p.q[i] = hash_uniform(3 * i);
    for (std::size_t i = 0; i < p.k.size(); ++i) {
      p.k[i] = hash_uniform(3 * i + 1);
      p.v[i] = hash_uniform(3 * i + 2);
    }
    for (int t = 0; t < tokens; ++t)  // the logit of token t flags t-1: 7 of every 8 flagged
      std::fill_n(p.logits.begin() + std::ptrdiff_t(t) * kv_heads, kv_heads,
                  (t >= 1 && (t - 1) % 8 == 0) ? -1.0f : 1.0f);
    cached = tokens;
  }
  return p;
}

template <class T, class P>
void bm_prefill_fast(benchmark::State& state, P policy) {
  const int tokens = int(state.range(0));
  const int pages_per_row = (tokens + page_size - 1) / page_size;
  dms::cache_config cfg;
  cfg.num_kv_heads = kv_heads;
  cfg.group_size = group_size;
  cfg.head_dim = head_dim;
  cfg.page_size = page_size;
  cfg.max_sequences = 1;
  cfg.max_row_slots = pages_per_row * page_size;
  cfg.max_pages = kv_heads * pages_per_row;
  dms::paged_cache<T, P> cache(cfg, std::move(policy));
  const prompt& p = prompt_for(tokens);
  std::vector<float> out(p.q.size());
  for (auto _ : state) {
    state.PauseTiming();
    const int seq = cache.add_sequence();
    state.ResumeTiming();
    dms::cpu::prefill(cache, seq, {p.q, p.k, p.v, p.logits}, tokens, {out});
    benchmark::DoNotOptimize(out.data());
    state.PauseTiming();
    cache.remove_sequence(seq);
    state.ResumeTiming();
  }
  const double flops = 4.0 * kv_heads * group_size * head_dim * double(tokens) * (tokens + 1) / 2;
  state.counters["causal_gflops"] =
      benchmark::Counter(flops * 1e-9 * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(tokens) * double(state.iterations()), benchmark::Counter::kIsRate);
}

template <class T>
void register_prefill_fast(const std::string& kv, bool scores_too) {
  const auto add = [&](const std::string& policy, std::vector<std::int64_t> sizes, auto make) {
    const std::string name = "prefill_fast/" + kv + "/" + policy;
    auto* b = benchmark::RegisterBenchmark(name.c_str(), [make](benchmark::State& s) {
      bm_prefill_fast<T>(s, make(int(s.range(0))));
    });
    b->ArgNames({"tokens"})->UseRealTime()->Unit(benchmark::kMillisecond);
    for (const std::int64_t t : sizes) b->Args({t});
  };
  add("dense", {1024, 4096, 16384}, [](int) { return dms::dense_policy{}; });
  add("dms", {1024, 4096, 16384}, [](int) { return dms::dms_policy{{.window = dms_window}}; });
  if (!scores_too) return;
  add("tova", {1024, 4096}, [](int t) { return dms::tova_policy{{.budget = t / 8}}; });
  add("h2o", {1024, 4096},
      [](int t) { return dms::h2o_policy{{.budget = t / 8, .recent = t / 16}}; });
}

// Registered before main() runs (which then only adds the rooflines and the reference's).
const bool registered = [] {
  register_decode_fast<dms::bfloat16>("bf16");
  register_decode_fast<float>("f32");
  register_paged_read<dms::bfloat16>("bf16");
  register_paged_read<float>("f32");
  register_page_size<dms::bfloat16>("bf16");
  register_page_size<float>("f32");
  register_adjacent<dms::bfloat16>("bf16");
  register_adjacent<float>("f32");
  register_in_cache<dms::bfloat16>("bf16");
  register_in_cache<float>("f32");
  register_prefill_fast<dms::bfloat16>("bf16", true);
  register_prefill_fast<float>("f32", false);
  return true;
}();

}  // namespace
