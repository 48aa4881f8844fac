// SPDX-License-Identifier: Apache-2.0
#pragma once

// The inputs of dms::cuda::prefill_attention (prefill_batch), how it treats each device policy
// (prefill_traits), and its launch shapes (prefill_tuning). Part of dms/cuda/prefill_attention.cuh,
// whose header comment describes the design.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/prefill_attention/options.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cstdint>
#include <type_traits>

#include "dms/config.hpp"
#include "dms/policy/dense.hpp"
#include "dms/policy/dms.hpp"
#include "dms/policy/h2o.hpp"
#include "dms/policy/quest.hpp"
#include "dms/policy/snapkv.hpp"
#include "dms/policy/streaming_llm.hpp"
#include "dms/policy/tova.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

/// Prompts of a batch of sequences, token-major, in device memory. Token i of sequence b is at
/// index b * tokens + i of every array; the entry points take a chunk [begin, begin + length) of
/// it. Sequences shorter than `tokens` are left-padded: their first padding[b] tokens are not
/// tokens at all (not cached, no position, outputs 0 and lse -inf).
template <class T>
struct prefill_batch {
  const std::int32_t* seq_ids = nullptr;  // [batch] cache sequence ids, distinct and active
  int batch = 0;
  int tokens = 0;                          // tokens per sequence in the arrays (padding included)
  const T* q = nullptr;                    // [batch][tokens][num_query_heads][head_dim]
  const T* k = nullptr;                    // [batch][tokens][num_kv_heads][head_dim]
  const T* v = nullptr;                    // [batch][tokens][num_kv_heads][head_dim]
  const float* decision_logits = nullptr;  // [batch][tokens][num_kv_heads], or null: no token
                                           // flagged (DMS); ignored by other policies
  const std::int32_t* padding = nullptr;   // [batch] leading padding tokens, or null: none
  T* out = nullptr;                        // [batch][tokens][num_query_heads][head_dim]
  float* lse = nullptr;                    // [batch][tokens][num_query_heads], or null
  float softmax_scale = 0.0f;              // <= 0: 1 / sqrt(head_dim)
  bool allow_tensor_cores = true;          // false: always the SIMT kernel (tests, debugging)
};

/// How prefill treats a device policy. `known`: its choose_victim names no slot inside the prompt
/// (or DMS's shift rule does), which the chunk append relies on. `dms`: DMS visibility with
/// window(policy). Specialize for a policy of your own.
template <class DevicePolicy>
struct prefill_traits {
  static constexpr bool known = std::is_same_v<DevicePolicy, dense_device_policy> ||
                                std::is_same_v<DevicePolicy, quest_device_policy> ||
                                std::is_same_v<DevicePolicy, tova_device_policy> ||
                                std::is_same_v<DevicePolicy, h2o_device_policy> ||
                                std::is_same_v<DevicePolicy, snapkv_device_policy> ||
                                std::is_same_v<DevicePolicy, streaming_device_policy>;
  static constexpr bool dms = false;
  static std::int32_t window(const DevicePolicy&) { return -1; }
};
template <>
struct prefill_traits<dms_device_policy> {
  static constexpr bool known = true;
  static constexpr bool dms = true;
  static std::int32_t window(const dms_device_policy& p) { return p.window; }
};

/// Launch shapes, as plain data.
struct prefill_tuning {
  static constexpr int keys_threads = 256;  // key-list pre-pass: one block per row
  static constexpr int mma_block_m = 64;    // query rows (token, head) per CTA: 4 warps x 16
  static constexpr int mma_block_n = 64;    // keys per tile
  static constexpr int mma_threads = 128;
  static constexpr int simt_warps = 4;  // query rows per block of the SIMT kernel
};

}  // namespace cuda
DMS_NAMESPACE_END
