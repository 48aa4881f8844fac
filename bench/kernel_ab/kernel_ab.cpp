// SPDX-License-Identifier: Apache-2.0
//
// dms_bench_kernel_ab: the library's x86-64 decode kernel against another version of it, in one
// process, so that the two see the same minutes of a shared machine. Built only when CMake is
// given DMS_BENCH_KERNEL_VARIANT, the path of a decode_kernel.inl (relative: from the repository
// root), for instance an older one: `git show REV:include/dms/cpu/decode_kernel.inl >
// build/variant.inl`. It is compiled in the namespaces dms::cpu::simd::avx512::variant and
// dms::cpu::simd::avx2::variant against the library's current primitives (ops.inl); the rows run
// the AVX-512 kernels where the CPU has AVX-512, else the AVX2 ones (the level is in the name).
//
//   kernel_ab/{library,variant}/<level>/<kv>/group:G/head_dim:D/context:C/rows:R
//       decode_chunk over the dense rows of a cache of C tokens in all (page 16), row after row,
//       item by item as the plan cuts it (decode_chunk_pages), on the calling thread. R = 1: one
//       row in adjacent pages; R = 8: eight rows of C / 8 tokens whose pages interleave (the
//       default stack placement, as in bench/cpu_fast.cpp's caches), so that each page of a row
//       is somewhere else and only software prefetch fetches it ahead. C = 512 keeps bf16 K/V in
//       L2, 262144 reads it from memory. Counter: ns_per_key (per key, all G heads), from the
//       process's CPU time: time the VM's host takes away is not counted. A variant may read
//       knobs from the environment (<cstdlib> is included before it).
// Run with --benchmark_enable_random_interleaving=true --benchmark_repetitions=N and compare the
// medians of the two rows of a shape. Needs a CPU with AVX2 (the rows report an error
// otherwise).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
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
DMS_CPU_TARGET_AVX2_BEGIN
namespace dms::cpu::simd::avx2::variant {
#include DMS_BENCH_KERNEL_VARIANT_INL
}  // namespace dms::cpu::simd::avx2::variant
DMS_CPU_TARGET_END
DMS_CPU_DIAGNOSTICS_END
#endif

namespace {

using dms_bench::hash_uniform;

#if DMS_CPU_HAS_X86_TARGETS
/// The level the rows run: AVX-512 where the CPU has it, else AVX2.
bool runs_avx512() {
  return dms::cpu::simd_level_supported(dms::cpu::simd_level::avx512);
}
#endif

/// `rows` rows (KV heads of one sequence) of context / rows tokens each, appended token by
/// token. One row gets adjacent pages (one run); several get the default stack placement, so
/// their pages interleave page by page, as in the decode_fast caches of bench/cpu_fast.cpp.
template <class T>
struct row_fixture {
  row_fixture(int group, int head_dim, int context, int rows)
      : cache(config(group, head_dim, context / rows, rows), dms::dense_policy{},
              rows == 1 ? dms::page_placement::adjacent : dms::page_placement::stack),
        row_tokens(context / rows) {
    const int seq = cache.add_sequence();
    const std::size_t n = std::size_t(rows) * std::size_t(head_dim);
    std::vector<float> k(n), v(n), logit(std::size_t(rows), -1.0f);
    for (int t = 0; t < row_tokens; ++t) {
      for (std::size_t c = 0; c < n; ++c) {
        k[c] = hash_uniform(std::uint64_t(t) * 1000003u + c);
        v[c] = hash_uniform(~(std::uint64_t(t) * 1000003u + c));
      }
      cache.append(seq, k, v, logit);
    }
    // The wider level's padding: the AVX2 kernels take it too (a multiple of their chunk).
    constexpr int cw = 2 * dms::cpu::simd::avx512::width;
    dpad = (head_dim + cw - 1) / cw * cw;
    q.resize(std::size_t(group) * std::size_t(dpad));
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = 0.1f * hash_uniform(77 + i);
    acc.resize(q.size());
    m.resize(std::size_t(group));
    l.resize(std::size_t(group));
  }
  static dms::cache_config config(int group, int head_dim, int row_tokens, int rows) {
    dms::cache_config cfg;
    cfg.num_kv_heads = rows;
    cfg.group_size = group;
    cfg.head_dim = head_dim;
    cfg.page_size = 16;
    cfg.max_sequences = 1;
    cfg.max_row_slots = (row_tokens / 16 + 1) * 16;
    cfg.max_pages = rows * (row_tokens / 16 + 1);
    return cfg;
  }
  dms::paged_cache<T, dms::dense_policy> cache;
  int row_tokens;
  int dpad = 0;
  std::vector<float> q, acc, m, l;
  int count = 0;
};

template <class T, bool Variant>
void bm_kernel(benchmark::State& state) {
#if DMS_CPU_HAS_X86_TARGETS
  if (!dms::cpu::simd_level_supported(dms::cpu::simd_level::avx2)) {
    state.SkipWithError("needs AVX2");
    return;
  }
  const bool avx512 = runs_avx512();
  const int group = int(state.range(0)), head_dim = int(state.range(1));
  const int context = int(state.range(2)), rows = int(state.range(3));
  row_fixture<T> fx(group, head_dim, context, rows);
  const auto& cache = fx.cache;
  const int item_pages = dms::cpu::detail::decode_chunk_pages(16);
  dms::cpu::detail::decode_chunk_args<T> a{cache.view(),  0,           fx.row_tokens,
                                           nullptr,       0,           0,
                                           group,         fx.dpad,     fx.q.data(),
                                           fx.acc.data(), fx.m.data(), fx.l.data(),
                                           nullptr,       nullptr,     0,
                                           &fx.count};
  for (auto _ : state) {
    for (int r = 0; r < rows; ++r) {  // the rows one after the other, item by item
      a.row = r;
      const int pages = cache.view().num_pages(r);
      for (int p0 = 0; p0 < pages; p0 += item_pages) {
        a.first_page = p0;
        a.num_pages = std::min(item_pages, pages - p0);
        if constexpr (Variant) {
          if (avx512)
            dms::cpu::simd::avx512::variant::decode_chunk<T>(a);
          else
            dms::cpu::simd::avx2::variant::decode_chunk<T>(a);
        } else {
          if (avx512)
            dms::cpu::simd::avx512::decode_chunk<T>(a);
          else
            dms::cpu::simd::avx2::decode_chunk<T>(a);
        }
        benchmark::DoNotOptimize(fx.acc.data());
        benchmark::ClobberMemory();
      }
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
#if DMS_CPU_HAS_X86_TARGETS
  const char* level = runs_avx512() ? "avx512/" : "avx2/";
#else
  const char* level = "";
#endif
  const std::string name =
      std::string("kernel_ab/") + (Variant ? "variant/" : "library/") + level + kv;
  benchmark::RegisterBenchmark(name.c_str(), &bm_kernel<T, Variant>)
      ->ArgNames({"group", "head_dim", "context", "rows"})
      ->ArgsProduct({{4}, {128}, {512, 262144}, {1}})
      ->Args({4, 128, 262144, 8})
      ->Args({8, 128, 512, 1})
      ->Args({4, 64, 512, 1})
      ->Args({1, 128, 512, 1})
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
