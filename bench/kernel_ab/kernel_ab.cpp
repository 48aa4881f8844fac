// SPDX-License-Identifier: Apache-2.0
//
// dms_bench_kernel_ab: the library's AVX-512 decode kernel against another version of it, in one
// process, so that the two see the same minutes of a shared machine. Built only when CMake is
// given DMS_BENCH_KERNEL_VARIANT, the path of a decode_kernel.inl (relative: from the repository
// root), for instance an older one: `git show REV:include/dms/cpu/decode_kernel.inl >
// build/variant.inl`. It is compiled in the namespace dms::cpu::simd::avx512::variant against
// the library's current primitives (ops.inl).
//
//   kernel_ab/{library,variant}/<kv>/group:G/head_dim:D/context:C
//       decode_chunk over one dense row of C tokens (adjacent pages, page 16), item by item as
//       the plan cuts it (decode_chunk_pages), on the calling thread. C = 512 keeps bf16 K/V in
//       L2, 262144 reads it from memory. Counter: ns_per_key (per key of the row, all G heads),
//       from the process's CPU time: time the VM's host takes away is not counted.
// Run with --benchmark_enable_random_interleaving=true --benchmark_repetitions=N and compare the
// medians of the two rows of a shape. Needs a CPU with AVX-512 (the rows report an error
// otherwise).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../hash_uniform.hpp"
#include "dms/cpu.hpp"
#include "dms/dms.hpp"

#if DMS_CPU_HAS_X86_TARGETS
DMS_CPU_DIAGNOSTICS_BEGIN
DMS_CPU_TARGET_AVX512_BEGIN
namespace dms::cpu::simd::avx512::variant {
#include DMS_BENCH_KERNEL_VARIANT_INL
}  // namespace dms::cpu::simd::avx512::variant
DMS_CPU_TARGET_END
DMS_CPU_DIAGNOSTICS_END
#endif

namespace {

using dms_bench::hash_uniform;

template <class T>
struct row_fixture {
  row_fixture(int group, int head_dim, int context)
      : cache(config(group, head_dim, context), dms::dense_policy{},
              dms::page_placement::adjacent) {
    const int seq = cache.add_sequence();
    std::vector<float> k(static_cast<std::size_t>(head_dim)), v(k.size()), logit(1, -1.0f);
    for (int t = 0; t < context; ++t) {
      for (int c = 0; c < head_dim; ++c) {
        k[std::size_t(c)] = hash_uniform(std::uint64_t(t) * 1000003u + std::uint64_t(c));
        v[std::size_t(c)] = hash_uniform(~(std::uint64_t(t) * 1000003u + std::uint64_t(c)));
      }
      cache.append(seq, k, v, logit);
    }
    constexpr int cw = 2 * dms::cpu::simd::avx512::width;
    dpad = (head_dim + cw - 1) / cw * cw;
    q.resize(std::size_t(group) * std::size_t(dpad));
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = 0.1f * hash_uniform(77 + i);
    acc.resize(q.size());
    m.resize(std::size_t(group));
    l.resize(std::size_t(group));
  }
  static dms::cache_config config(int group, int head_dim, int context) {
    dms::cache_config cfg;
    cfg.num_kv_heads = 1;
    cfg.group_size = group;
    cfg.head_dim = head_dim;
    cfg.page_size = 16;
    cfg.max_sequences = 1;
    cfg.max_row_slots = (context / 16 + 1) * 16;
    cfg.max_pages = context / 16 + 1;
    return cfg;
  }
  dms::paged_cache<T, dms::dense_policy> cache;
  int dpad = 0;
  std::vector<float> q, acc, m, l;
  int count = 0;
};

template <class T, bool Variant>
void bm_kernel(benchmark::State& state) {
#if DMS_CPU_HAS_X86_TARGETS
  if (!dms::cpu::simd_level_supported(dms::cpu::simd_level::avx512)) {
    state.SkipWithError("needs AVX-512");
    return;
  }
  const int group = int(state.range(0)), head_dim = int(state.range(1));
  const int context = int(state.range(2));
  row_fixture<T> fx(group, head_dim, context);
  const auto& cache = fx.cache;
  const int pages = cache.view().num_pages(0);
  const int item_pages = dms::cpu::detail::decode_chunk_pages(16);
  dms::cpu::detail::decode_chunk_args<T> a{
      cache.view(),  0,           context,     nullptr, 0,       0, group,    fx.dpad, fx.q.data(),
      fx.acc.data(), fx.m.data(), fx.l.data(), nullptr, nullptr, 0, &fx.count};
  for (auto _ : state) {
    for (int p0 = 0; p0 < pages; p0 += item_pages) {
      a.first_page = p0;
      a.num_pages = std::min(item_pages, pages - p0);
      if constexpr (Variant)
        dms::cpu::simd::avx512::variant::decode_chunk<T>(a);
      else
        dms::cpu::simd::avx512::decode_chunk<T>(a);
      benchmark::DoNotOptimize(fx.acc.data());
      benchmark::ClobberMemory();
    }
  }
  state.counters["ns_per_key"] =
      benchmark::Counter(double(state.iterations()) * context * 1e-9,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
#else
  state.SkipWithError("x86-64 only");
#endif
}

template <class T, bool Variant>
void add(const std::string& kv) {
  const std::string name = std::string("kernel_ab/") + (Variant ? "variant/" : "library/") + kv;
  benchmark::RegisterBenchmark(name.c_str(), &bm_kernel<T, Variant>)
      ->ArgNames({"group", "head_dim", "context"})
      ->ArgsProduct({{4}, {128}, {512, 262144}})
      ->Args({8, 128, 512})
      ->Args({4, 64, 512})
      ->Args({1, 128, 512})
      ->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
  add<dms::bfloat16, false>("bf16");
  add<dms::bfloat16, true>("bf16");
  add<float, false>("f32");
  add<float, true>("f32");
  add<dms::half, false>("f16");
  add<dms::half, true>("f16");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
