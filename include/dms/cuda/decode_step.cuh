// SPDX-License-Identifier: Apache-2.0
#pragma once

// One whole decode step on the device for any policy with a device form:
//
//   append          new K/V into every row of the batch (victim rule, slot reuse, pages)
//   select_pages    Quest only: the pages each row reads
//   attention       split-K paged decode attention; TOVA/H2O fold probabilities into scores
//   evict           TOVA/H2O only: rows shrink to their budget
//
// Every stage is stream-ordered with no host synchronization and no device-to-host copy, so a
// step can be captured in a CUDA graph and replayed. decode_step is the CUB-shaped entry point;
// `decoder` owns the temporary storage for callers who prefer that.
//
// A step that cannot complete (pool exhausted, row full, bad or duplicate sequence id), and
// every step after one that could not, leaves the cache as it was and records why in the cache's
// sticky status word (device_cache::status / check_status); its attention then reads nothing,
// so every row's output is defined: out = 0, lse = -inf, no score fold, no KV reads counted.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/decode_step.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "dms/config.hpp"
#include "dms/cuda/bookkeeping.cuh"
#include "dms/cuda/check.cuh"
#include "dms/cuda/decode_attention.cuh"
#include "dms/cuda/device_buffer.cuh"
#include "dms/cuda/device_cache.cuh"
#include "dms/cuda/quest_select.cuh"
#include "dms/error.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// The step's inputs, all device pointers. Batch entry b is sequence seq_ids[b].
template <class In, class Q>
struct decode_step_inputs {
  const std::int32_t* seq_ids = nullptr;  // [batch]
  int batch = 0;
  const In* k = nullptr;                   // [batch][num_kv_heads][head_dim] new keys (RoPE'd)
  const In* v = nullptr;                   // [batch][num_kv_heads][head_dim] new values
  const float* decision_logits = nullptr;  // [batch][num_kv_heads]; null for policies without
  const Q* q = nullptr;                    // [batch][num_query_heads][head_dim]
};

template <class Q>
struct decode_step_outputs {
  Q* out = nullptr;                  // [batch][num_query_heads][head_dim]; 0 if the step failed
  float* lse = nullptr;              // [batch][num_query_heads], optional; -inf if it failed
  std::int64_t* kv_reads = nullptr;  // optional: += slots read (the paper's KV-read counter)
  float softmax_scale = 0.0f;        // 0 = 1 / sqrt(head_dim)
  int num_sms = 0;                   // 0 = ask the current device
};

namespace detail {

inline std::size_t align_temp(std::size_t n) {
  return (n + 255) / 256 * 256;
}

// Pages a Quest row may read in one step: the stride of the selection arrays.
template <class T, class DevicePolicy>
int selection_stride(const cache_state<T>& st, const DevicePolicy& policy) {
  return std::min(policy.page_budget(st.page_size), st.max_pages_per_row);
}

}  // namespace detail

/// Runs one decode step. d_temp == nullptr: only sets temp_bytes (which depends on the batch
/// size, the cache's shapes and the policy, not on the contents of the cache).
template <class T, class DevicePolicy, class In, class Q>
[[nodiscard]] cudaError_t decode_step(void* d_temp, std::size_t& temp_bytes,
                                      const cache_state<T>& st, const DevicePolicy& policy,
                                      const decode_step_inputs<In, Q>& in,
                                      const decode_step_outputs<Q>& out,
                                      cudaStream_t stream = nullptr) {
  if (in.batch < 0) return cudaErrorInvalidValue;
  const int rows = in.batch * st.num_kv_heads;
  const cache_view<const T> view = st.view().read_only();

  // Sizes of every stage's temporary storage, then one carve-up.
  std::size_t append_bytes = 0, select_bytes = 0, attention_bytes = 0;
  DMS_CUDA_TRY(append(nullptr, append_bytes, st, policy, in.seq_ids, in.batch, in.k, in.v,
                      in.decision_logits, false, stream));
  int stride = 0;
  if constexpr (DevicePolicy::selects_pages) {
    stride = detail::selection_stride(st, policy);
    DMS_CUDA_TRY(select_pages(nullptr, select_bytes, view, in.seq_ids, in.batch, in.q, policy,
                              static_cast<std::int32_t*>(nullptr),
                              static_cast<std::int32_t*>(nullptr), stride, stream));
  }
  const std::size_t pages_bytes = sizeof(std::int32_t) * std::size_t(rows) * stride;
  const std::size_t counts_bytes = DevicePolicy::selects_pages ? sizeof(std::int32_t) * rows : 0;
  decode_options opt;
  opt.softmax_scale = out.softmax_scale;
  opt.lse = out.lse;
  opt.kv_reads = out.kv_reads;
  opt.num_sms = out.num_sms;
  opt.fold = DevicePolicy::decode_score;
  opt.score = DevicePolicy::decode_score == score_update::none ? nullptr : st.score;
  opt.page_stride = stride;
  opt.max_pages = st.max_pages;
  opt.skip_if_failed = st.status;  // the append below may fail: attend only if it did not
  DMS_CUDA_TRY(decode_attention(nullptr, attention_bytes, view, in.seq_ids, in.batch, in.q, out.out,
                                opt, stream));
  const std::size_t sizes[] = {append_bytes, select_bytes, pages_bytes, counts_bytes,
                               attention_bytes};
  std::size_t need = 0;
  for (const std::size_t s : sizes) need += detail::align_temp(s);
  if (d_temp == nullptr) {
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need) return cudaErrorInvalidValue;
  if (in.batch == 0) return cudaSuccess;
  auto* base = static_cast<unsigned char*>(d_temp);
  void* parts[5];
  for (int i = 0; i < 5; ++i) {
    parts[i] = base;
    base += detail::align_temp(sizes[i]);
  }

  DMS_CUDA_TRY(append(parts[0], append_bytes, st, policy, in.seq_ids, in.batch, in.k, in.v,
                      in.decision_logits, false, stream));
  if constexpr (DevicePolicy::selects_pages) {
    opt.pages = static_cast<const std::int32_t*>(parts[2]);
    opt.page_counts = static_cast<const std::int32_t*>(parts[3]);
    DMS_CUDA_TRY(select_pages(parts[1], select_bytes, view, in.seq_ids, in.batch, in.q, policy,
                              static_cast<std::int32_t*>(parts[2]),
                              static_cast<std::int32_t*>(parts[3]), stride, stream));
  }
  DMS_CUDA_TRY(decode_attention(parts[4], attention_bytes, view, in.seq_ids, in.batch, in.q,
                                out.out, opt, stream));
  return evict_after_attention(st, policy, in.seq_ids, in.batch, stream);
}

/// Convenience: a device cache plus the temporary storage of its steps.
///
/// The storage grows on demand in eager use, which needs a stream synchronize and a cudaMalloc:
/// neither is allowed while the stream is being captured into a CUDA graph. So before capturing a
/// step (the first one included), reserve() the storage for the largest batch the graph will
/// run; a step under capture that would have to grow throws dms::error instead of breaking the
/// capture. Throws dms::error on CUDA errors; device-side step errors stay in the cache's status.
template <storage_type T, class Policy>
class decoder {
 public:
  explicit decoder(device_cache<T, Policy>& cache) : cache_(&cache) {}
  /// The same, with reserve(max_batch, num_sms) done.
  decoder(device_cache<T, Policy>& cache, int max_batch, int num_sms = 0) : cache_(&cache) {
    reserve(max_batch, num_sms);
  }

  /// Allocates now the temporary storage of a step of up to max_batch sequences (in [1,
  /// cache_config::max_sequences]: a larger batch repeats an id and can only fail), for steps
  /// whose decode_step_outputs::num_sms is num_sms (0 = the current device's). The size depends
  /// on the batch, the cache's shapes, the policy and num_sms only, and grows with the batch, so
  /// every smaller batch fits too. Waits for `stream` before replacing a smaller buffer.
  void reserve(int max_batch, int num_sms = 0, cudaStream_t stream = nullptr) {
    const int max_sequences = cache_->config().max_sequences;
    if (max_batch < 1 || max_batch > max_sequences)
      ::dms::detail::fail("decoder::reserve: max_batch = ", max_batch,
                          " is outside the valid range [1, ", max_sequences,
                          "] (cache_config::max_sequences)");
    if (num_sms < 0)
      ::dms::detail::fail("decoder::reserve: num_sms = ", num_sms,
                          " is outside the valid range [0, 65536] (0 = the current device)");
    decode_step_inputs<float, float> in;
    in.batch = max_batch;
    decode_step_outputs<float> out;
    out.num_sms = num_sms;
    std::size_t bytes = 0;
    check(decode_step(nullptr, bytes, cache_->state(), cache_->device_policy(), in, out, stream),
          "dms::cuda::decode_step (sizing)");
    grow(bytes, stream);
  }

  /// Bytes of temporary storage held now.
  [[nodiscard]] std::size_t reserved_bytes() const { return temp_.size(); }

  template <class In, class Q>
  void step(const decode_step_inputs<In, Q>& in, const decode_step_outputs<Q>& out,
            cudaStream_t stream = nullptr) {
    std::size_t bytes = 0;
    check(decode_step(nullptr, bytes, cache_->state(), cache_->device_policy(), in, out, stream),
          "dms::cuda::decode_step (sizing)");
    if (bytes > temp_.size()) {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      check(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
      if (capture != cudaStreamCaptureStatusNone)
        ::dms::detail::fail("decoder::step under CUDA graph capture needs ", bytes,
                            " bytes of temporary storage but ", temp_.size(),
                            " are reserved (batch = ", in.batch,
                            "): call reserve(max_batch) before capturing");
      grow(bytes, stream);
    }
    bytes = temp_.size();
    check(
        decode_step(temp_.data(), bytes, cache_->state(), cache_->device_policy(), in, out, stream),
        "dms::cuda::decode_step");
  }

  [[nodiscard]] device_cache<T, Policy>& cache() const { return *cache_; }

 private:
  void grow(std::size_t bytes, cudaStream_t stream) {
    if (bytes <= temp_.size()) return;
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");  // temp_ may be in use
    temp_ = device_buffer<unsigned char>(bytes);
  }

  device_cache<T, Policy>* cache_;
  device_buffer<unsigned char> temp_;
};

}  // namespace cuda
DMS_NAMESPACE_END
