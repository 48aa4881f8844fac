// SPDX-License-Identifier: Apache-2.0
//
// dms_bench_cuda: the device read roofline. This file holds main(); other bench/*.cu files only
// register benchmarks (BENCHMARK(...)) and share bench/cuda_bench_util.cuh.
//
//   read_roofline/uint4/buffer_MiB:N   a read-only stream over N MiB (16-byte loads per thread,
//                                      grid-stride, one full wave of resident blocks), L2 flushed
//                                      before every iteration, CUDA-event timed (manual time).
//                                      bytes_per_second = N MiB / kernel time.
//
// Without a CUDA device every benchmark reports "no CUDA device" and is skipped; the program
// exits 0.

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda_bench_util.cuh"

namespace {

void bm_read_roofline(benchmark::State& state) {
  if (!dms_bench::require_device(state)) return;
  const std::size_t bytes = std::size_t(state.range(0)) << 20;
  constexpr int threads = 256;

  dms_bench::device_buffer<unsigned char> buf(bytes);
  if (!dms_bench::cuda_ok(state, buf.status(), "cudaMalloc (buffer)")) return;
  dms_bench::device_buffer<unsigned> sink(1);
  if (!dms_bench::cuda_ok(state, sink.status(), "cudaMalloc (sink)")) return;
  // Written once so every page is backed by memory.
  if (!dms_bench::cuda_ok(state, cudaMemset(buf.get(), 0x5a, bytes), "cudaMemset")) return;
  int blocks = 0;
  if (!dms_bench::cuda_ok(state,
                          dms_bench::full_grid(dms_bench::read_stream_kernel<4>, threads, &blocks),
                          "occupancy query"))
    return;
  dms_bench::l2_flusher flusher;

  const bool ok = dms_bench::timed_loop(state, flusher, [&](cudaStream_t stream) {
    return dms_bench::launch_read_stream(buf.get(), bytes, sink.get(), blocks, threads, stream);
  });
  if (!ok) return;
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(bytes));
  state.counters["dram_bytes_per_s"] = dms_bench::device_bytes_per_second(state, double(bytes));
  state.counters["blocks"] = blocks;
  state.counters["flush_MiB"] = double(flusher.bytes() >> 20);
}

BENCHMARK(bm_read_roofline)
    ->Name("read_roofline/uint4")
    ->ArgName("buffer_MiB")
    ->Arg(1024)
    ->Arg(4096)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// The device, in the benchmark context of the console and JSON output.
void add_device_context() {
  int device = 0;
  cudaDeviceProp prop{};
  if (dms_bench::device_count() == 0 || cudaGetDevice(&device) != cudaSuccess ||
      cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    (void)cudaGetLastError();
    benchmark::AddCustomContext("cuda_device", "none");
    return;
  }
  const auto str = [](auto x) { return std::to_string(x); };
  benchmark::AddCustomContext(
      "cuda_device", std::string(prop.name) + " (sm_" + str(prop.major) + str(prop.minor) + ", " +
                         str(prop.multiProcessorCount) + " SMs, " + str(prop.totalGlobalMem >> 20) +
                         " MiB, L2 " + str(prop.l2CacheSize >> 10) + " KiB)");
  int runtime = 0, driver = 0;
  (void)cudaRuntimeGetVersion(&runtime);
  (void)cudaDriverGetVersion(&driver);
  benchmark::AddCustomContext("cuda_versions",
                              "runtime " + str(runtime) + ", driver " + str(driver));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_device_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
