// SPDX-License-Identifier: Apache-2.0
#pragma once

// device_buffer<T>: an owning, move-only array in device memory (plain cudaMalloc; no managed
// memory), with stream-ordered copies to and from host vectors. Throws dms::error on failure.

#if !defined(__CUDACC__)
#error \
    "dms/cuda/device_buffer.cuh is CUDA code: include it from a .cu translation unit compiled by nvcc"
#endif

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>
#include <vector>

#include "dms/config.hpp"
#include "dms/cuda/check.cuh"
#include "dms/error.hpp"

DMS_NAMESPACE_BEGIN
namespace cuda {

template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t n) : size_(n) {
    if (n > 0) check(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(T)), "cudaMalloc");
  }
  device_buffer(device_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { reset(); }

  [[nodiscard]] T* data() const { return data_; }
  [[nodiscard]] std::size_t size() const { return size_; }
  [[nodiscard]] bool empty() const { return size_ == 0; }

  /// Copies h into the buffer (sizes must match). h must outlive the copy: the call returns
  /// when the copy is enqueued, and pageable memory makes it synchronous in practice.
  void upload(const std::vector<T>& h, cudaStream_t stream) {
    if (h.size() != size_)
      ::dms::detail::fail("device_buffer::upload: host vector has ", h.size(),
                          " elements; expected ", size_);
    if (size_ > 0)
      check(cudaMemcpyAsync(data_, h.data(), size_ * sizeof(T), cudaMemcpyHostToDevice, stream),
            "cudaMemcpyAsync (host to device)");
  }
  /// Copies the buffer into h (resized), and waits for the stream.
  void download(std::vector<T>& h, cudaStream_t stream) const {
    h.resize(size_);
    if (size_ > 0)
      check(cudaMemcpyAsync(h.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost, stream),
            "cudaMemcpyAsync (device to host)");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }

 private:
  void reset() {
    if (data_) cudaFree(data_);  // cannot throw from a destructor; a failure here is a leak only
    data_ = nullptr;
    size_ = 0;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace cuda
DMS_NAMESPACE_END
