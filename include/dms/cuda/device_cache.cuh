// SPDX-License-Identifier: Apache-2.0
#pragma once

// device_cache<T, Policy>: one layer's cache in device memory — the same configuration, policy
// and layout as the host cache (dms/step/cache_state.hpp), owned with RAII. It hands out the
// views that the device entry points take, and converts to and from host caches (through
// cache_image) for tests and debugging. Sequence ids are tracked on the host too, so adding one
// needs no device round trip; everything else the kernels do stays on the device.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/device_cache.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "dms/cache_config.hpp"
#include "dms/config.hpp"
#include "dms/cuda/bookkeeping.cuh"
#include "dms/cuda/check.cuh"
#include "dms/cuda/device_buffer.cuh"
#include "dms/error.hpp"
#include "dms/numeric.hpp"
#include "dms/paged_cache.hpp"
#include "dms/policy/device_policy.hpp"
#include "dms/step/cache_image.hpp"
#include "dms/step/cache_state.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

template <storage_type T, class Policy>
class device_cache {
  static_assert(has_device_form<Policy>,
                "dms::cuda::device_cache: the policy has no device form (see "
                "dms/policy/device_policy.hpp: `device_form()`)");

 public:
  using value_type = T;
  using policy_type = Policy;
  using device_policy_type = device_form_t<Policy>;

  /// An empty cache: every page free, no sequences.
  explicit device_cache(const cache_config& cfg, Policy policy = Policy{},
                        cudaStream_t stream = nullptr)
      : cfg_((cfg.validate(), cfg)), policy_(policy), device_policy_(policy_.device_form()) {
    allocate();
    upload(empty_image(), stream);
  }

  /// A copy of a host cache (same configuration and policy parameters).
  explicit device_cache(const paged_cache<T, Policy>& host, cudaStream_t stream = nullptr)
      : cfg_(host.config()), policy_(host.policy()), device_policy_(policy_.device_form()) {
    allocate();
    upload(host.to_image(), stream);
  }

  [[nodiscard]] const cache_config& config() const { return cfg_; }
  [[nodiscard]] const Policy& policy() const { return policy_; }
  [[nodiscard]] const device_policy_type& device_policy() const { return device_policy_; }

  /// Everything the bookkeeping kernels touch; the read-only view attention takes.
  [[nodiscard]] cache_state<T> state() const {
    return {k_.data(),
            v_.data(),
            position_.data(),
            score_.empty() ? nullptr : score_.data(),
            page_min_.empty() ? nullptr : page_min_.data(),
            page_max_.empty() ? nullptr : page_max_.data(),
            page_table_.data(),
            row_length_.data(),
            live_.data(),
            seen_.data(),
            peak_.data(),
            hole_head_.data(),
            free_pages_.data(),
            free_top_.data(),
            ring_slot_.empty() ? nullptr : ring_slot_.data(),
            ring_flag_.empty() ? nullptr : ring_flag_.data(),
            active_.data(),
            status_.data(),
            cfg_.num_kv_heads,
            cfg_.group_size,
            cfg_.head_dim,
            cfg_.page_size,
            cfg_.max_pages,
            cfg_.max_pages_per_row(),
            cfg_.max_sequences,
            cfg_.max_row_slots,
            ring_length_};
  }
  [[nodiscard]] cache_view<T> view() const { return state().view(); }

  // ---- sequences (ids mirrored on the host; no device round trip) --------------------------

  /// Marks the lowest free id active and returns it. Its rows are empty (fresh or released).
  int add_sequence(cudaStream_t stream = nullptr) {
    int seq = 0;
    while (seq < cfg_.max_sequences && active_host_[seq]) ++seq;
    if (seq == cfg_.max_sequences)
      ::dms::detail::fail("cannot add a sequence: all ", cfg_.max_sequences,
                          " sequence slots (cache_config.max_sequences) are in use");
    check(cudaMemsetAsync(active_.data() + seq, 1, 1, stream), "cudaMemsetAsync (add_sequence)");
    active_host_[seq] = true;
    return seq;
  }

  /// Frees the sequence's pages on the device; its id may be handed out again.
  void remove_sequence(int seq, cudaStream_t stream = nullptr) {
    if (!contains(seq))
      ::dms::detail::fail("unknown sequence id ", seq,
                          " (valid: ids returned by add_sequence, in [0, ", cfg_.max_sequences - 1,
                          "])");
    check(cudaMemcpyAsync(scratch_seq_.data(), &seq_staging_[seq], sizeof(std::int32_t),
                          cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (remove_sequence)");
    check(release_sequences(state(), scratch_seq_.data(), 1, stream), "release_sequences");
    active_host_[seq] = false;
  }

  [[nodiscard]] bool contains(int seq) const {
    return seq >= 0 && seq < cfg_.max_sequences && active_host_[seq];
  }

  // ---- status ------------------------------------------------------------------------------

  /// Waits for the stream and returns the sticky status of the device steps.
  [[nodiscard]] step_status status(cudaStream_t stream = nullptr) const {
    std::int32_t s = 0;
    check(cudaMemcpyAsync(&s, status_.data(), sizeof s, cudaMemcpyDeviceToHost, stream),
          "cudaMemcpyAsync (status)");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return step_status(s);
  }
  /// Throws dms::error naming the failure if a device step failed.
  void check_status(cudaStream_t stream = nullptr) const {
    const step_status s = status(stream);
    if (s != step_status::ok)
      ::dms::detail::fail("device cache step failed: ", step_status_name(s),
                          " (later steps were skipped; clear_status() to resume)");
  }
  void clear_status(cudaStream_t stream = nullptr) {
    check(cudaMemsetAsync(status_.data(), 0, sizeof(std::int32_t), stream), "cudaMemsetAsync");
  }

  // ---- host interchange ----------------------------------------------------------------------

  /// Replaces the device contents by an image of the same configuration.
  void upload(const cache_image<T>& img, cudaStream_t stream = nullptr) {
    if (!(img.config == cfg_))
      ::dms::detail::fail(
          "device_cache::upload: the image's cache_config differs from this cache's");
    if (img.ring_length != ring_length_)
      ::dms::detail::fail("device_cache::upload: image ring_length = ", img.ring_length,
                          ", the policy needs ", ring_length_);
    k_.upload(img.k, stream);
    v_.upload(img.v, stream);
    position_.upload(img.position, stream);
    if (!score_.empty()) score_.upload(img.score, stream);
    if (!page_min_.empty()) {
      page_min_.upload(img.page_min, stream);
      page_max_.upload(img.page_max, stream);
    }
    page_table_.upload(img.page_table, stream);
    row_length_.upload(img.row_length, stream);
    live_.upload(img.live, stream);
    seen_.upload(img.seen, stream);
    peak_.upload(img.peak, stream);
    hole_head_.upload(img.hole_head, stream);
    free_pages_.upload(img.free_pages, stream);
    free_top_.upload(std::vector<std::int32_t>{img.free_top}, stream);
    if (!ring_slot_.empty()) ring_slot_.upload(img.ring_slot, stream);
    if (!ring_flag_.empty()) ring_flag_.upload(img.ring_flag, stream);
    active_.upload(img.active, stream);
    status_.upload(std::vector<std::int32_t>{img.status}, stream);
    // Pageable host memory: the copies above completed before they returned, except that the
    // two temporaries must outlive theirs, which a synchronize guarantees.
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    for (int s = 0; s < cfg_.max_sequences; ++s) active_host_[s] = img.active[s] != 0;
  }

  /// A host copy of everything (waits for the stream).
  [[nodiscard]] cache_image<T> download(cudaStream_t stream = nullptr) const {
    cache_image<T> img = empty_image();
    k_.download(img.k, stream);
    v_.download(img.v, stream);
    position_.download(img.position, stream);
    if (!score_.empty()) score_.download(img.score, stream);
    if (!page_min_.empty()) {
      page_min_.download(img.page_min, stream);
      page_max_.download(img.page_max, stream);
    }
    page_table_.download(img.page_table, stream);
    row_length_.download(img.row_length, stream);
    live_.download(img.live, stream);
    seen_.download(img.seen, stream);
    peak_.download(img.peak, stream);
    hole_head_.download(img.hole_head, stream);
    free_pages_.download(img.free_pages, stream);
    std::vector<std::int32_t> one;
    free_top_.download(one, stream);
    img.free_top = one[0];
    if (!ring_slot_.empty()) ring_slot_.download(img.ring_slot, stream);
    if (!ring_flag_.empty()) ring_flag_.download(img.ring_flag, stream);
    active_.download(img.active, stream);
    status_.download(one, stream);
    img.status = one[0];
    return img;
  }

  /// Loads the device contents into a host cache of the same configuration and policy.
  void download_to(paged_cache<T, Policy>& host, cudaStream_t stream = nullptr) const {
    host.load_image(download(stream));
  }

 private:
  cache_image<T> empty_image() const {
    return cache_image<T>(cfg_, device_policy_type::keeps_scores,
                          device_policy_type::needs_page_bounds, ring_length_,
                          device_policy_type::ring_flags);
  }

  void allocate() {
    ring_length_ = device_policy_.ring_length();
    const auto slots = std::size_t(cfg_.max_pages) * cfg_.page_size;
    const auto rows = std::size_t(cfg_.max_rows());
    k_ = device_buffer<T>(slots * cfg_.head_dim);
    v_ = device_buffer<T>(slots * cfg_.head_dim);
    position_ = device_buffer<std::int32_t>(slots);
    if (device_policy_type::keeps_scores) score_ = device_buffer<float>(slots);
    if (device_policy_type::needs_page_bounds) {
      page_min_ = device_buffer<float>(std::size_t(cfg_.max_pages) * cfg_.head_dim);
      page_max_ = device_buffer<float>(std::size_t(cfg_.max_pages) * cfg_.head_dim);
    }
    page_table_ = device_buffer<std::int32_t>(rows * cfg_.max_pages_per_row());
    row_length_ = device_buffer<std::int32_t>(rows);
    live_ = device_buffer<std::int32_t>(rows);
    seen_ = device_buffer<std::int32_t>(rows);
    peak_ = device_buffer<std::int32_t>(rows);
    hole_head_ = device_buffer<std::int32_t>(rows);
    free_pages_ = device_buffer<std::int32_t>(std::size_t(cfg_.max_pages));
    free_top_ = device_buffer<std::int32_t>(1);
    if (ring_length_ > 0) ring_slot_ = device_buffer<std::int32_t>(rows * ring_length_);
    if (ring_length_ > 0 && device_policy_type::ring_flags)
      ring_flag_ = device_buffer<std::uint8_t>(rows * ring_length_);
    active_ = device_buffer<std::uint8_t>(std::size_t(cfg_.max_sequences));
    status_ = device_buffer<std::int32_t>(1);
    scratch_seq_ = device_buffer<std::int32_t>(1);
    active_host_.assign(std::size_t(cfg_.max_sequences), false);
    seq_staging_.resize(std::size_t(cfg_.max_sequences));
    for (int s = 0; s < cfg_.max_sequences; ++s) seq_staging_[s] = s;
  }

  cache_config cfg_;
  Policy policy_;
  device_policy_type device_policy_;
  int ring_length_ = 0;
  device_buffer<T> k_, v_;
  device_buffer<std::int32_t> position_;
  device_buffer<float> score_, page_min_, page_max_;
  device_buffer<std::int32_t> page_table_, row_length_, live_, seen_, peak_, hole_head_;
  device_buffer<std::int32_t> free_pages_, free_top_, ring_slot_;
  device_buffer<std::uint8_t> ring_flag_, active_;
  device_buffer<std::int32_t> status_, scratch_seq_;
  std::vector<bool> active_host_;
  std::vector<std::int32_t> seq_staging_;  // stable host addresses of every id, for async copies
};

}  // namespace cuda
DMS_NAMESPACE_END
