// SPDX-License-Identifier: Apache-2.0
//
// dms_bench_cpu: the CPU reference decode path against the machine's read bandwidth, measured in
// the same run. This file holds main() and the rooflines (cpu_roofline.hpp); other
// bench/cpu_*.cpp files only register benchmarks (cpu_fast.cpp: the fast path).
//
//   read_roofline/...     a read-only, vectorized sum over a buffer well beyond the last-level
//                         cache: the bytes/s one core (and all cores) can stream from memory.
//   decode/<kv>/<policy>  dms::reference::decode_attention for one decode step of `batch`
//                         sequences: 8 KV heads x G=4 (32 query heads), head_dim 128, page 16,
//                         K/V stored as bf16 or f32, `context` tokens in every row.
//                           dense  every token is live and read;
//                           dms    DMS with window 512 (Qwen3-8B-DMS-8x); the decision logits
//                                  flag 7 of every 8 tokens, so past the window 1/8 of the tokens
//                                  survive (the logit carried by token t decides token t-1);
//                           quest  Quest at a non-dense layer, token budget context / 8.
//                         Counters: kv_bytes_per_step (live slots read x head_dim x 2 (K and V)
//                         x sizeof(storage), from the cache's own read counter), bytes_per_second
//                         (those bytes over wall time), tokens_per_s (decoded tokens, one per
//                         sequence per step), frac_of_1core_read_roofline (bytes_per_second over
//                         the best of five one-core passes of the read roofline loop, measured at
//                         startup and reported in the context), slots_read_per_row,
//                         live_slots_per_row and the cache's compression ratio.
//   bookkeeping/<policy>  paged_cache::append + finish_step for every sequence of a batch: one
//                         decode step's cache maintenance without the attention (scores stay 0).
//
// All timings are wall time (UseRealTime); everything runs on one thread except the two-thread
// roofline. Each decode cache is built once per shape, outside the timed loop.

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cpu_roofline.hpp"
#include "dms/dms.hpp"
#include "hash_uniform.hpp"

namespace dms_bench {
double one_core_read_roofline = 0.0;  // set in main()
double two_core_read_roofline = 0.0;
}  // namespace dms_bench

namespace {

// ---- shapes ----------------------------------------------------------------------------------

constexpr int kv_heads = 8;
constexpr int group_size = 4;
constexpr int head_dim = 128;
constexpr int page_size = 16;
constexpr int dms_window = 512;  // Qwen3-8B-DMS-8x
constexpr int keep_one_in = 8;   // DMS keeps 1 of every 8 tokens past the window; Quest reads 1/8

using dms_bench::hash_uniform;

// The DMS logit carried by token t: it decides token t-1, which is kept (logit < 0) for one
// token in every keep_one_in and evicted (logit > 0) otherwise.
float dms_logit(std::int64_t t) {
  return (t >= 1 && (t - 1) % keep_one_in == 0) ? -1.0f : 1.0f;
}

// ---- read roofline ---------------------------------------------------------------------------

// At least 256 MiB, and at least twice the last-level cache the OS reports (a VM that reports a
// 480 MiB L3 gets 1 GiB).
std::size_t roofline_buffer_bytes() {
  constexpr std::size_t step = std::size_t{256} << 20;
  std::size_t llc = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) llc = std::size_t(l3);
#endif
  return std::max(step, (2 * llc + step - 1) / step * step);
}

// The page pool's allocator (huge pages where the OS gives them), so that the roofline reads
// memory mapped the way the K/V it is compared with are.
using roofline_vector = std::vector<float, dms::page_memory_allocator<float>>;

const roofline_vector& roofline_buffer() {
  // Written, not just allocated: untouched pages would all map to the shared zero page.
  static const roofline_vector buf = [] {
    roofline_vector b(roofline_buffer_bytes() / sizeof(float));
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = float(i & 1023) * 0.25f;
    return b;
  }();
  return buf;
}

// Sums n floats with 32 independent accumulators: the compiler vectorizes the inner loop as is
// (no reassociation, so no -ffast-math needed) and keeps several vector adds in flight.
float read_sum(const float* p, std::size_t n) {
  constexpr std::size_t lanes = 32;
  float acc[lanes] = {};
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes)
    for (std::size_t j = 0; j < lanes; ++j) acc[j] += p[i + j];
  for (; i < n; ++i) acc[0] += p[i];
  float sum = 0.0f;
  for (const float a : acc) sum += a;
  return sum;
}

// Best of a few passes over the whole buffer, bytes/s, on `threads` threads that each stream
// their own slice. Measured once, before any benchmark runs.
double measure_read_roofline(int threads) {
  const auto& buf = roofline_buffer();
  const std::size_t n = buf.size() / std::size_t(threads);
  double best = 0.0;
  for (int pass = 0; pass < 5; ++pass) {
    std::vector<float> sums(static_cast<std::size_t>(threads));
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> workers;
    for (int t = 1; t < threads; ++t)
      workers.emplace_back([&, t] { sums[std::size_t(t)] = read_sum(buf.data() + n * t, n); });
    sums[0] = read_sum(buf.data(), n);
    for (auto& w : workers) w.join();
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    benchmark::DoNotOptimize(sums.data());
    best = std::max(best, double(n * std::size_t(threads) * sizeof(float)) / dt.count());
  }
  return best;
}

using dms_bench::one_core_read_roofline;

void bm_read_roofline(benchmark::State& state) {
  const auto& buf = roofline_buffer();
  // Each thread streams its own slice, so the threads never share cache lines.
  const std::size_t n = buf.size() / std::size_t(state.threads());
  const float* p = buf.data() + n * std::size_t(state.thread_index());
  for (auto _ : state) {
    float s = read_sum(p, n);
    benchmark::DoNotOptimize(s);
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n * sizeof(float)));
  state.counters["buffer_MiB"] = double(buf.size() * sizeof(float)) / double(1 << 20);
}

// ---- decode attention ------------------------------------------------------------------------

struct fixture_base {
  virtual ~fixture_base() = default;
};

template <class T, class P>
struct decode_fixture final : fixture_base {
  decode_fixture(const dms::cache_config& cfg, P policy) : cache(cfg, std::move(policy)) {}
  dms::paged_cache<T, P> cache;
  std::vector<int> seqs;
  std::vector<float> q, out;  // [batch][num_query_heads][head_dim]
};

// One cache alive at a time: Google Benchmark runs all repetitions of a benchmark back to back,
// so a single slot keyed by (storage, policy, shape) builds each cache once and never holds two
// of the large ones.
struct fixture_slot {
  std::string key;
  std::unique_ptr<fixture_base> fixture;
};
fixture_slot& current_fixture() {
  static fixture_slot slot;
  return slot;
}

template <class T, class P>
std::unique_ptr<decode_fixture<T, P>> build_decode_fixture(int batch, int context,
                                                           const P& policy) {
  const int pages_per_row = (context + page_size - 1) / page_size;
  dms::cache_config cfg;
  cfg.num_kv_heads = kv_heads;
  cfg.group_size = group_size;
  cfg.head_dim = head_dim;
  cfg.page_size = page_size;
  cfg.max_sequences = batch;
  cfg.max_row_slots = pages_per_row * page_size;
  cfg.max_pages = batch * kv_heads * pages_per_row;
  auto fx = std::make_unique<decode_fixture<T, P>>(cfg, policy);

  const std::size_t kn = std::size_t(kv_heads) * head_dim;
  const std::size_t qn = std::size_t(cfg.num_query_heads()) * head_dim;
  std::vector<float> k(kn), v(kn), logits(kv_heads);
  for (int s = 0; s < batch; ++s) fx->seqs.push_back(fx->cache.add_sequence());
  // Token-major, as decode appends them: pages of the sequences interleave in the pool.
  for (int t = 0; t < context; ++t) {
    std::fill(logits.begin(), logits.end(), dms_logit(t));
    for (int s = 0; s < batch; ++s) {
      const std::uint64_t base =
          (std::uint64_t(s) * std::uint64_t(context) + std::uint64_t(t)) * 2 * std::uint64_t(kn);
      for (std::size_t i = 0; i < kn; ++i) {
        k[i] = hash_uniform(base + i);
        v[i] = hash_uniform(base + kn + i);
      }
      fx->cache.append(fx->seqs[std::size_t(s)], k, v, logits);
    }
  }
  fx->q.resize(std::size_t(batch) * qn);
  for (std::size_t i = 0; i < fx->q.size(); ++i) fx->q[i] = hash_uniform(~std::uint64_t{0} - i);
  fx->out.assign(fx->q.size(), 0.0f);
  return fx;
}

template <class T, class P>
decode_fixture<T, P>& decode_fixture_for(const std::string& name, int batch, int context,
                                         const P& policy) {
  const std::string key = name + "/" + std::to_string(batch) + "/" + std::to_string(context);
  auto& slot = current_fixture();
  if (slot.key != key) {
    slot.fixture.reset();  // free the previous cache before building the next
    slot.key.clear();
    slot.fixture = build_decode_fixture<T, P>(batch, context, policy);
    slot.key = key;
  }
  // The key names the storage and policy, so the fixture has this type.
  return static_cast<decode_fixture<T, P>&>(*slot.fixture);
}

template <class T, class P>
void bm_decode(benchmark::State& state, const std::string& name, P policy) {
  const int batch = int(state.range(0));
  const int context = int(state.range(1));
  auto& fx = decode_fixture_for<T, P>(name, batch, context, policy);
  const std::size_t qn = std::size_t(kv_heads) * group_size * head_dim;

  const std::int64_t reads_before = fx.cache.stats().kv_token_reads;
  const auto started = std::chrono::steady_clock::now();
  for (auto _ : state) {
    for (std::size_t i = 0; i < fx.seqs.size(); ++i)
      dms::reference::decode_attention(fx.cache, fx.seqs[i],
                                       std::span<const float>(fx.q).subspan(i * qn, qn),
                                       std::span<float>(fx.out).subspan(i * qn, qn));
    benchmark::DoNotOptimize(fx.out.data());
    benchmark::ClobberMemory();
  }
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - started;
  const dms::cache_stats st = fx.cache.stats();
  const double iterations = double(state.iterations());
  const double rows = double(batch) * kv_heads;
  const double slots_read = double(st.kv_token_reads - reads_before);
  const double kv_bytes = slots_read * head_dim * 2.0 * double(sizeof(T));

  state.SetBytesProcessed(std::int64_t(kv_bytes));
  state.counters["kv_bytes_per_step"] = kv_bytes / iterations;
  state.counters["tokens_per_s"] =
      benchmark::Counter(iterations * batch, benchmark::Counter::kIsRate);
  // A plain number, not a rate counter (which the console would print as "/s"): the loop's wall
  // time is the benchmark's real time up to the loop exit.
  state.counters["frac_of_1core_read_roofline"] =
      kv_bytes / elapsed.count() / one_core_read_roofline;
  state.counters["slots_read_per_row"] = slots_read / iterations / rows;
  state.counters["live_slots_per_row"] = double(st.live_slots) / rows;
  state.counters["compression"] = st.compression_ratio;
}

template <class T>
void register_decode(const std::string& kv) {
  const auto shapes = [](benchmark::internal::Benchmark* b) {
    b->ArgNames({"batch", "context"})
        ->ArgsProduct({{1, 4}, {1024, 4096, 16384}})
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  };
  const std::string dense = "decode/" + kv + "/dense";
  shapes(benchmark::RegisterBenchmark(dense.c_str(), [dense](benchmark::State& s) {
    bm_decode<T>(s, dense, dms::dense_policy{});
  }));
  const std::string dmsn = "decode/" + kv + "/dms";
  shapes(benchmark::RegisterBenchmark(dmsn.c_str(), [dmsn](benchmark::State& s) {
    bm_decode<T>(s, dmsn, dms::dms_policy{{.window = dms_window}});
  }));
  const std::string quest = "decode/" + kv + "/quest";
  shapes(benchmark::RegisterBenchmark(quest.c_str(), [quest](benchmark::State& s) {
    // layer 2: the official setup reads layers 0 and 1 densely.
    const int budget = int(s.range(1)) / keep_one_in;
    bm_decode<T>(s, quest, dms::quest_policy{{.token_budget = budget, .layer = 2}});
  }));
}

// ---- bookkeeping -----------------------------------------------------------------------------

// append + finish_step for every sequence of the batch, starting from `context` tokens per row
// (appended through the same two calls, so TOVA and H2O sit at their budgets). The iteration
// count is fixed so that the rows' capacity can be sized up front.
template <class P>
void bm_bookkeeping(benchmark::State& state, P policy) {
  using T = dms::bfloat16;
  const int batch = int(state.range(0));
  const int context = int(state.range(1));
  const auto steps = std::int64_t(state.max_iterations);
  const int pages_per_row = int((context + steps + page_size) / page_size);
  dms::cache_config cfg;
  cfg.num_kv_heads = kv_heads;
  cfg.group_size = group_size;
  cfg.head_dim = head_dim;
  cfg.page_size = page_size;
  cfg.max_sequences = batch;
  cfg.max_row_slots = pages_per_row * page_size;
  cfg.max_pages = batch * kv_heads * pages_per_row;
  dms::paged_cache<T, P> cache(cfg, std::move(policy));

  // A small pool of token vectors, cycled: generating K/V is not what is measured.
  constexpr int pool = 61;
  const std::size_t kn = std::size_t(kv_heads) * head_dim;
  std::vector<float> kv(std::size_t(pool) * 2 * kn);
  for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = hash_uniform(i);
  const auto k_of = [&](std::int64_t t, int s) {
    return std::span<const float>(kv).subspan(std::size_t((t + 7 * s) % pool) * 2 * kn, kn);
  };
  const auto v_of = [&](std::int64_t t, int s) {
    return std::span<const float>(kv).subspan(std::size_t((t + 7 * s) % pool) * 2 * kn + kn, kn);
  };

  std::vector<int> seqs;
  for (int s = 0; s < batch; ++s) seqs.push_back(cache.add_sequence());
  std::vector<float> logits(kv_heads);
  std::int64_t t = 0;
  for (; t < context; ++t) {
    std::fill(logits.begin(), logits.end(), dms_logit(t));
    for (int s = 0; s < batch; ++s) {
      cache.append(seqs[std::size_t(s)], k_of(t, s), v_of(t, s), logits);
      cache.finish_step(seqs[std::size_t(s)]);
    }
  }

  for (auto _ : state) {
    std::fill(logits.begin(), logits.end(), dms_logit(t));
    for (int s = 0; s < batch; ++s) {
      cache.append(seqs[std::size_t(s)], k_of(t, s), v_of(t, s), logits);
      cache.finish_step(seqs[std::size_t(s)]);
    }
    ++t;
  }
  const dms::cache_stats st = cache.stats();
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(state.iterations()) * batch, benchmark::Counter::kIsRate);
  state.counters["live_slots_per_row"] = double(st.live_slots) / (double(batch) * kv_heads);
}

template <class P>
void register_bookkeeping(const std::string& policy_name, P policy) {
  const std::string name = "bookkeeping/bf16/" + policy_name;
  benchmark::RegisterBenchmark(name.c_str(),
                               [policy](benchmark::State& s) { bm_bookkeeping(s, policy); })
      ->ArgNames({"batch", "context"})
      ->Args({4, 4096})
      ->Iterations(2048)
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  dms_bench::one_core_read_roofline = measure_read_roofline(1);
  dms_bench::two_core_read_roofline = measure_read_roofline(2);
  char line[64];
  std::snprintf(line, sizeof line, "%.4g", dms_bench::one_core_read_roofline);
  benchmark::AddCustomContext("one_core_read_roofline_bytes_per_s", line);
  std::snprintf(line, sizeof line, "%.4g", dms_bench::two_core_read_roofline);
  benchmark::AddCustomContext("two_core_read_roofline_bytes_per_s", line);
  std::snprintf(line, sizeof line, "%zu", roofline_buffer_bytes() >> 20);
  benchmark::AddCustomContext("roofline_buffer_MiB", line);
  benchmark::AddCustomContext("dms_version", std::to_string(DMS_VERSION_MAJOR) + "." +
                                                 std::to_string(DMS_VERSION_MINOR) + "." +
                                                 std::to_string(DMS_VERSION_PATCH));

  benchmark::RegisterBenchmark("read_roofline/f32_sum", bm_read_roofline)
      ->Threads(1)
      ->Threads(2)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);

  register_decode<dms::bfloat16>("bf16");
  register_decode<float>("f32");

  const int budget = 4096 / keep_one_in;
  register_bookkeeping("dense", dms::dense_policy{});
  register_bookkeeping("dms", dms::dms_policy{{.window = dms_window}});
  register_bookkeeping("tova", dms::tova_policy{{.budget = budget}});
  register_bookkeeping("h2o", dms::h2o_policy{{.budget = budget, .recent = budget / 2}});

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
