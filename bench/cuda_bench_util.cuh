// SPDX-License-Identifier: Apache-2.0
#pragma once

// Helpers for the GPU benchmarks of dms_bench_cuda (bench/*.cu). A GPU benchmark is
//
//   void bm_x(benchmark::State& state) {
//     if (!dms_bench::require_device(state)) return;          // skips without a CUDA device
//     dms_bench::device_buffer<T> buf(n);                       // RAII cudaMalloc
//     if (!dms_bench::cuda_ok(state, buf.status(), "cudaMalloc")) return;
//     dms_bench::l2_flusher flush;                              // 256 MiB+ scratch
//     dms_bench::timed_loop(state, flush, [&](cudaStream_t s) { my_kernel<<<g, b, 0, s>>>(...); });
//     state.SetBytesProcessed(...);                             // or the counter below
//     state.counters["dram_bytes_per_s"] = dms_bench::device_bytes_per_second(state, bytes);
//   }
//   BENCHMARK(bm_x)->UseManualTime()->Unit(benchmark::kMicrosecond);
//
// timed_loop times each iteration with a CUDA event pair around the launch only and reports it
// through state.SetIterationTime, so the benchmark must use ->UseManualTime(). The L2 is flushed
// before every iteration, outside the timed region, so each timed launch reads from HBM. Nothing
// here throws: a CUDA error skips the benchmark with a message (state.SkipWithError).

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace dms_bench {

/// True if err is cudaSuccess; otherwise skips the benchmark with "<what>: <CUDA error>" and
/// clears the (non-sticky) error so later benchmarks start clean.
inline bool cuda_ok(benchmark::State& state, cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  const std::string msg =
      std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  (void)cudaGetLastError();
  state.SkipWithError(msg.c_str());
  return false;
}

/// Number of CUDA devices, 0 if there are none or the driver cannot be reached.
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

/// Skips the benchmark with "no CUDA device" (and returns false) on a machine without a GPU.
inline bool require_device(benchmark::State& state) {
  if (device_count() > 0) return true;
  state.SkipWithError("no CUDA device");
  return false;
}

/// Owning device allocation of n elements of T. Check status() after construction.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t n) : n_(n) {
    status_ = cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T));
    if (status_ != cudaSuccess) {
      (void)cudaGetLastError();
      p_ = nullptr;
      n_ = 0;
    }
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)), status_(o.status_) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
      status_ = o.status_;
    }
    return *this;
  }
  ~device_buffer() { reset(); }

  [[nodiscard]] T* get() const { return p_; }
  [[nodiscard]] std::size_t size() const { return n_; }
  [[nodiscard]] std::size_t bytes() const { return n_ * sizeof(T); }
  [[nodiscard]] cudaError_t status() const { return status_; }

 private:
  void reset() {
    if (p_) (void)cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
  cudaError_t status_ = cudaSuccess;
};

/// Two CUDA events around a region of one stream. Check status() after construction.
class event_pair {
 public:
  event_pair() {
    status_ = cudaEventCreate(&start_);
    if (status_ == cudaSuccess) status_ = cudaEventCreate(&stop_);
  }
  event_pair(const event_pair&) = delete;
  event_pair& operator=(const event_pair&) = delete;
  ~event_pair() {
    if (start_) (void)cudaEventDestroy(start_);
    if (stop_) (void)cudaEventDestroy(stop_);
  }

  [[nodiscard]] cudaError_t status() const { return status_; }
  cudaError_t start(cudaStream_t stream) { return cudaEventRecord(start_, stream); }
  cudaError_t stop(cudaStream_t stream) { return cudaEventRecord(stop_, stream); }
  /// Waits for the stop event, then writes the time between the two records in milliseconds.
  cudaError_t elapsed_ms(float* ms) {
    const cudaError_t err = cudaEventSynchronize(stop_);
    if (err != cudaSuccess) return err;
    return cudaEventElapsedTime(ms, start_, stop_);
  }

 private:
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
  cudaError_t status_ = cudaSuccess;
};

/// Evicts the L2 by writing a scratch buffer: 256 MiB, or 4x the device's L2 if that is more.
/// Check status() after construction.
class l2_flusher {
 public:
  l2_flusher() {
    int device = 0, l2 = 0;
    status_ = cudaGetDevice(&device);
    if (status_ == cudaSuccess)
      status_ = cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
    if (status_ != cudaSuccess) return;
    scratch_ = device_buffer<unsigned char>(
        std::max(std::size_t{256} << 20, 4 * static_cast<std::size_t>(l2)));
    status_ = scratch_.status();
  }
  [[nodiscard]] cudaError_t status() const { return status_; }
  [[nodiscard]] std::size_t bytes() const { return scratch_.bytes(); }
  /// Enqueues the flush on `stream`; work enqueued after it on the same stream starts cold.
  cudaError_t flush(cudaStream_t stream) {
    value_ ^= 1;  // a different value each time: every byte is really rewritten
    return cudaMemsetAsync(scratch_.get(), value_, scratch_.bytes(), stream);
  }

 private:
  device_buffer<unsigned char> scratch_;
  cudaError_t status_ = cudaSuccess;
  int value_ = 0;
};

/// The benchmark loop: per iteration, flush the L2 (untimed), then time launch(stream) with an
/// event pair and report it through state.SetIterationTime. Use with ->UseManualTime(). Returns
/// false (the benchmark already skipped with the error) if anything failed. launch may return a
/// cudaError_t, which is checked; launch errors are also caught with cudaGetLastError after each
/// launch, and execution errors at the event synchronization.
template <class Launch>
bool timed_loop(benchmark::State& state, l2_flusher& flusher, Launch&& launch,
                cudaStream_t stream = nullptr) {
  if (!cuda_ok(state, flusher.status(), "l2_flusher")) return false;
  event_pair events;
  if (!cuda_ok(state, events.status(), "cudaEventCreate")) return false;
  for (auto _ : state) {
    if (!cuda_ok(state, flusher.flush(stream), "L2 flush (cudaMemsetAsync)")) return false;
    if (!cuda_ok(state, events.start(stream), "cudaEventRecord")) return false;
    if constexpr (std::is_same_v<std::invoke_result_t<Launch&, cudaStream_t>, cudaError_t>) {
      if (!cuda_ok(state, launch(stream), "launch")) return false;
    } else {
      launch(stream);
    }
    if (!cuda_ok(state, cudaGetLastError(), "kernel launch")) return false;
    if (!cuda_ok(state, events.stop(stream), "cudaEventRecord")) return false;
    float ms = 0.0f;
    if (!cuda_ok(state, events.elapsed_ms(&ms), "timed region")) return false;
    state.SetIterationTime(double(ms) * 1e-3);
  }
  return true;
}

/// A rate counter: bytes_per_iteration x iterations over the benchmark's (manual) time, in
/// decimal units (1e9 = GB/s, as HBM bandwidth is quoted). Set it after the loop:
///   state.counters["dram_bytes_per_s"] = device_bytes_per_second(state, bytes);
inline benchmark::Counter device_bytes_per_second(const benchmark::State& state,
                                                  double bytes_per_iteration) {
  return benchmark::Counter(bytes_per_iteration * double(state.iterations()),
                            benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

// ---- the device read roofline ---------------------------------------------------------------

/// Read-only stream: every thread loads 16-byte vectors, grid-stride, four loads in flight, and
/// folds them into one word per warp so the loads are not dead code. A template, so that several
/// .cu files may include this header without a duplicate kernel symbol.
template <int Unroll = 4>
__global__ void read_stream_kernel(const uint4* __restrict__ p, std::size_t n,
                                   unsigned* __restrict__ sink) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + (Unroll - 1) * stride < n; i += Unroll * stride) {
    uint4 x[Unroll];
#pragma unroll
    for (int u = 0; u < Unroll; ++u) x[u] = p[i + u * stride];
#pragma unroll
    for (int u = 0; u < Unroll; ++u) acc ^= x[u].x ^ x[u].y ^ x[u].z ^ x[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 x = p[i];
    acc ^= x.x ^ x.y ^ x.z ^ x.w;
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, offset);
  if ((threadIdx.x & 31u) == 0) atomicXor(sink, acc);
}

/// Enough resident blocks of `threads` threads to fill every SM once.
template <class Kernel>
cudaError_t full_grid(Kernel kernel, int threads, int* blocks) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  *blocks = std::max(1, sms * per_sm);
  return err;
}

/// Launches read_stream_kernel over `bytes` (a multiple of 16) of `buf` on `stream`. Returns the
/// launch error without clearing it (cudaPeekAtLastError).
inline cudaError_t launch_read_stream(const void* buf, std::size_t bytes, unsigned* sink,
                                      int blocks, int threads, cudaStream_t stream) {
  read_stream_kernel<4>
      <<<blocks, threads, 0, stream>>>(static_cast<const uint4*>(buf), bytes / sizeof(uint4), sink);
  return cudaPeekAtLastError();
}

/// The device's read bandwidth in bytes/s: the best of 10 L2-cold streams over 1 GiB, measured
/// on first use and cached (0 without a device or on any error). GPU benchmarks can report a
/// fraction of it, as dms_bench_cpu does on the CPU.
inline double device_read_roofline() {
  static const double roofline = [] {
    constexpr int passes = 10;
    if (device_count() == 0) return 0.0;
    constexpr std::size_t bytes = std::size_t{1} << 30;
    constexpr int threads = 256;
    device_buffer<unsigned char> buf(bytes);
    device_buffer<unsigned> sink(1);
    l2_flusher flusher;
    event_pair events;
    int blocks = 0;
    if (buf.status() != cudaSuccess || sink.status() != cudaSuccess ||
        flusher.status() != cudaSuccess || events.status() != cudaSuccess ||
        full_grid(read_stream_kernel<4>, threads, &blocks) != cudaSuccess ||
        cudaMemset(buf.get(), 0x5a, bytes) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0.0;
    }
    double best = 0.0;
    for (int pass = 0; pass < passes; ++pass) {
      float ms = 0.0f;
      if (flusher.flush(nullptr) != cudaSuccess || events.start(nullptr) != cudaSuccess ||
          launch_read_stream(buf.get(), bytes, sink.get(), blocks, threads, nullptr) !=
              cudaSuccess ||
          events.stop(nullptr) != cudaSuccess || events.elapsed_ms(&ms) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0.0;
      }
      if (ms > 0.0f) best = std::max(best, double(bytes) / (double(ms) * 1e-3));
    }
    return best;
  }();
  return roofline;
}

}  // namespace dms_bench
