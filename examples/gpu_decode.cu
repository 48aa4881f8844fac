// SPDX-License-Identifier: Apache-2.0
//
// dms_gpu_decode: a DMS decode loop on the GPU, the shape an inference engine would use.
//
//   dms_gpu_decode [--steps N]
//
// One layer with 8 KV heads x G = 4 query heads, head_dim 128, bf16 K/V, a batch of 8 sequences.
// Every step, each sequence brings one token: its K/V, its query and one DMS decision logit per
// KV head (random here; a retrofitted model emits them). dms::cuda::decoder runs the whole step
// on the device — append with DMS's delayed eviction and slot reuse, paged split-K attention —
// without synchronizing with the host; the host only reads the cache's counters at the end.

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "dms/cuda/decode_step.cuh"
#include "dms/cuda/device_buffer.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/dms.hpp"

int main(int argc, char** argv) {
  int steps = 2048;
  for (int i = 1; i + 1 < argc; i += 2)
    if (std::string(argv[i]) == "--steps") steps = std::atoi(argv[i + 1]);
  if (steps < 1) {
    std::fprintf(stderr, "usage: %s [--steps N>0]\n", argv[0]);
    return 2;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("dms_gpu_decode: no CUDA device; nothing to do\n");
    return 0;
  }
  try {
    dms::cache_config cfg;
    cfg.num_kv_heads = 8;
    cfg.group_size = 4;
    cfg.head_dim = 128;
    cfg.page_size = 16;
    cfg.max_sequences = 8;
    cfg.max_row_slots = steps;
    cfg.max_pages = cfg.max_rows() * cfg.max_pages_per_row();
    const int B = cfg.max_sequences, H = cfg.num_kv_heads, d = cfg.head_dim;
    const int Hq = cfg.num_query_heads();

    using cache_type = dms::cuda::device_cache<dms::bfloat16, dms::dms_policy>;
    cache_type cache(cfg, dms::dms_policy(dms::dms_params{256}));
    std::vector<std::int32_t> ids;
    for (int s = 0; s < B; ++s) ids.push_back(cache.add_sequence());
    dms::cuda::decoder<dms::bfloat16, dms::dms_policy> decoder(cache, B);  // storage for B up front

    // Inputs for all steps at once, so the loop below issues kernels only. About 7 of 8 tokens
    // are flagged for eviction: the ~8x compression of the released DMS checkpoints.
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    const auto fill = [&](std::size_t n, auto gen) {
      std::vector<float> x(n);
      for (auto& e : x) e = gen();
      return x;
    };
    const auto per_step_kv = std::size_t(B) * H * d, per_step_q = std::size_t(B) * Hq * d;
    const auto k = fill(per_step_kv * steps, [&] { return normal(rng); });
    const auto v = fill(per_step_kv * steps, [&] { return normal(rng); });
    const auto q = fill(per_step_q * steps, [&] { return 0.1f * normal(rng); });
    const auto logits =
        fill(std::size_t(B) * H * steps, [&] { return uniform(rng) < 0.875f ? 1.0f : -1.0f; });
    const auto upload = [](const std::vector<float>& h) {
      dms::cuda::device_buffer<float> b(h.size());
      b.upload(h, nullptr);
      return b;
    };
    auto d_k = upload(k), d_v = upload(v), d_q = upload(q), d_logits = upload(logits);
    dms::cuda::device_buffer<std::int32_t> d_ids(ids.size());
    d_ids.upload(ids, nullptr);
    dms::cuda::device_buffer<float> d_out(per_step_q);

    cudaEvent_t start, stop;
    dms::cuda::check(cudaEventCreate(&start), "cudaEventCreate");
    dms::cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
    dms::cuda::check(cudaEventRecord(start), "cudaEventRecord");
    for (int t = 0; t < steps; ++t) {
      dms::cuda::decode_step_inputs<float, float> in;
      in.seq_ids = d_ids.data();
      in.batch = B;
      in.k = d_k.data() + per_step_kv * t;
      in.v = d_v.data() + per_step_kv * t;
      in.decision_logits = d_logits.data() + std::size_t(B) * H * t;
      in.q = d_q.data() + per_step_q * t;
      dms::cuda::decode_step_outputs<float> out;
      out.out = d_out.data();
      decoder.step(in, out);
    }
    dms::cuda::check(cudaEventRecord(stop), "cudaEventRecord");
    dms::cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    cache.check_status();
    float ms = 0.0f;
    dms::cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");

    // The counters, through a host copy of the cache.
    dms::paged_cache<dms::bfloat16, dms::dms_policy> host(cfg, cache.policy());
    cache.download_to(host);
    const dms::cache_stats st = host.stats();
    std::printf("%d steps x %d sequences: %.3f ms per step (append + evict + attention)\n", steps,
                B, double(ms) / steps);
    std::printf("tokens seen %lld, live slots %lld, compression %.2fx, pages in use %d of %d\n",
                static_cast<long long>(st.tokens_seen), static_cast<long long>(st.live_slots),
                st.compression_ratio, st.pages_in_use, cfg.max_pages);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dms_gpu_decode: %s\n", e.what());
    return 1;
  }
  return 0;
}
