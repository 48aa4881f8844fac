// SPDX-License-Identifier: Apache-2.0
// GPU prefill (dms::cuda::prefill: attention + chunk append) for issue 4: batch 1, 8 KV heads x
// G = 4, head_dim 128, bf16, T in {4K, 16K, 32K}, one shot (chunk = T) and chunks of 2K.
// DMS decisions are random per (KV head, token) with P(flagged) = 7/8 (compression ~8), window
// 512, as bench/peers/torch_prefill.py draws them; "none" flags nothing (the dense-mask case).
// Timed: the whole prefill of one fresh sequence (all launches, CUDA events); between
// iterations, untimed, the sequence is released and re-added and the L2 flushed.
// The training-free policies prefill densely, score the prompt on the GPU (TOVA: the last query;
// SnapKV: a 32-query window; H2O: every causal (query, key) pair, a fp32 SIMT pass) and reduce it
// to T/8 tokens per row (compression 8); their time next to bm_prefill_dense's is the cost of
// scoring + compression.
// counters: causal_tflops = FLOPs of dense causal attention (4 Hq d T (T+1) / 2) / time, the
// yardstick torch_prefill.py reports, and tokens_per_s.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "cuda_bench_util.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/cuda/prefill.cuh"

namespace {

enum flag_mode : int { dense_policy_run = 0, dms_random = 1, dms_none = 2 };

template <class Policy>
void run_prefill(benchmark::State& state, Policy policy, int mode) {
  if (!dms_bench::require_device(state)) return;
  using T = dms::bfloat16;
  const int tokens = int(state.range(0)), chunk = state.range(1) > 0 ? int(state.range(1)) : tokens;
  dms::cache_config cfg;
  cfg.num_kv_heads = 8;
  cfg.group_size = 4;
  cfg.head_dim = 128;
  cfg.page_size = 64;
  cfg.max_sequences = 1;
  cfg.max_row_slots = tokens;
  cfg.max_pages = cfg.num_kv_heads * ((tokens + cfg.page_size - 1) / cfg.page_size) + 8;
  dms::cuda::device_cache<T, Policy> dev(cfg, policy);
  int seq = dev.add_sequence();

  const std::size_t Hq = 32, Hk = 8, d = 128, n = std::size_t(tokens);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<T> q(n * Hq * d), k(n * Hk * d), v(n * Hk * d);
  for (auto& x : q) x = T(normal(rng));
  for (auto& x : k) x = T(normal(rng));
  for (auto& x : v) x = T(normal(rng));
  std::vector<float> logits(n * Hk);
  for (auto& x : logits) x = mode == dms_random && uniform(rng) < 7.0f / 8.0f ? 1.0f : -1.0f;
  dms::cuda::device_buffer<T> d_q(q.size()), d_k(k.size()), d_v(v.size()), d_out(q.size());
  dms::cuda::device_buffer<float> d_logits(logits.size());
  dms::cuda::device_buffer<std::int32_t> d_seq(1);
  d_q.upload(q, nullptr);
  d_k.upload(k, nullptr);
  d_v.upload(v, nullptr);
  d_logits.upload(logits, nullptr);
  d_seq.upload(std::vector<std::int32_t>{seq}, nullptr);

  dms::cuda::prefill_batch<T> in;
  in.seq_ids = d_seq.data();
  in.batch = 1;
  in.tokens = tokens;
  in.q = d_q.data();
  in.k = d_k.data();
  in.v = d_v.data();
  in.decision_logits = d_logits.data();
  in.out = d_out.data();
  std::size_t temp_bytes = 0;
  if (!dms_bench::cuda_ok(state, dms::cuda::prefill(nullptr, temp_bytes, dev, in, chunk),
                          "temp size"))
    return;
  dms::cuda::device_buffer<unsigned char> temp(temp_bytes);
  dms_bench::l2_flusher flush;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (auto _ : state) {
    dev.remove_sequence(seq);  // untimed: a fresh, empty sequence (same id)
    seq = dev.add_sequence();
    if (!dms_bench::cuda_ok(state, flush.flush(nullptr), "L2 flush")) break;
    cudaEventRecord(start);
    const cudaError_t err = dms::cuda::prefill(temp.data(), temp_bytes, dev, in, chunk);
    cudaEventRecord(stop);
    if (!dms_bench::cuda_ok(state, err, "prefill") ||
        !dms_bench::cuda_ok(state, cudaEventSynchronize(stop), "prefill run"))
      break;
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(double(ms) * 1e-3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (dev.status() != dms::step_status::ok) state.SkipWithError("cache status not ok");
  const double flops = 4.0 * double(Hq) * double(d) * double(tokens) * double(tokens + 1) / 2.0;
  state.counters["causal_tflops"] =
      benchmark::Counter(flops * 1e-12 * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["tokens_per_s"] =
      benchmark::Counter(double(tokens) * double(state.iterations()), benchmark::Counter::kIsRate);
}

void bm_prefill_dense(benchmark::State& s) {
  run_prefill(s, dms::dense_policy{}, dense_policy_run);
}
void bm_prefill_dms(benchmark::State& s) {
  run_prefill(s, dms::dms_policy{{.window = 512}}, dms_random);
}
void bm_prefill_dms_none_flagged(benchmark::State& s) {
  run_prefill(s, dms::dms_policy{{.window = 512}}, dms_none);
}

void bm_prefill_tova(benchmark::State& s) {
  run_prefill(s, dms::tova_policy{{.budget = int(s.range(0)) / 8}}, dense_policy_run);
}
void bm_prefill_h2o(benchmark::State& s) {
  const int budget = int(s.range(0)) / 8;
  run_prefill(s, dms::h2o_policy{{.budget = budget, .recent = budget / 2}}, dense_policy_run);
}
void bm_prefill_snapkv(benchmark::State& s) {
  run_prefill(s, dms::snapkv_policy{{.capacity = int(s.range(0)) / 8, .window = 32}},
              dense_policy_run);
}
void bm_prefill_streaming(benchmark::State& s) {
  run_prefill(s, dms::streaming_llm_policy{{.sinks = 4, .recent = int(s.range(0)) / 8 - 4}},
              dense_policy_run);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "chunk"});
  for (const int t : {4096, 16384, 32768})
    for (const int c : {0, 2048}) b->Args({t, c});  // chunk 0 = one shot
  b->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(10)
      ->Repetitions(3)
      ->ReportAggregatesOnly(true);
}

}  // namespace

BENCHMARK(bm_prefill_dense)->Apply(shapes);
BENCHMARK(bm_prefill_dms)->Apply(shapes);
BENCHMARK(bm_prefill_dms_none_flagged)->Apply(shapes);
BENCHMARK(bm_prefill_tova)->Apply(shapes);
BENCHMARK(bm_prefill_h2o)->Apply(shapes);
BENCHMARK(bm_prefill_snapkv)->Apply(shapes);
BENCHMARK(bm_prefill_streaming)->Apply(shapes);
