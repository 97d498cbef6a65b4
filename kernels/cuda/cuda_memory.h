#pragma once
/// Device memory, streams and events for host code, without CUDA types in the header (the
/// runtime includes it from .cc files). Built only when RINGATTN_WITH_CUDA. Every call checks
/// its CUDA return code and throws ringattn::Error(kCuda) naming the call; allocations are
/// counted under Device::kCUDA in ringattn/memory.h.

#include <cstddef>
#include <cstdint>
#include <utility>

#include "ringattn/tensor.h"

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

namespace ringattn::cuda {

/// Makes `device` current on the calling thread (threads start on device 0).
void set_device(int device);
/// The calling thread's current device.
int current_device();
/// Throws Error(kCuda) if a kernel launched earlier on this thread failed (cudaGetLastError).
void check_last_error(const char* what);

/// cudaMalloc with accounting; throws Error(kCuda) naming the size and the free memory.
void* device_alloc(size_t bytes);
/// Frees memory from device_alloc (null is fine). Never throws.
void device_free(void* ptr, size_t bytes) noexcept;

/// An owning device buffer of bytes (move-only). resize() keeps nothing of the old contents.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { resize(bytes); }
  ~DeviceBuffer() { device_free(ptr_, bytes_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      device_free(ptr_, bytes_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  /// Reallocates only when `bytes` differs from the current size.
  void resize(size_t bytes) {
    if (bytes == bytes_) return;
    device_free(ptr_, bytes_);
    ptr_ = nullptr;
    bytes_ = 0;
    if (bytes > 0) ptr_ = device_alloc(bytes);
    bytes_ = bytes;
  }
  void* data() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

/// An owned non-blocking stream (move-only).
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&&) = delete;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  /// Blocks until everything queued on the stream ran; throws Error(kCuda) on a failure.
  void synchronize() const;

 private:
  cudaStream_t s_ = nullptr;
};

/// An owned event without timing (move-only).
class Event {
 public:
  Event();
  ~Event();
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  Event& operator=(Event&&) = delete;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }
  void record(cudaStream_t stream);
  /// Makes `stream` wait for the last record (device side; the host does not block).
  void wait_on(cudaStream_t stream) const;
  void synchronize() const;
  bool query() const;

 private:
  cudaEvent_t e_ = nullptr;
};

/// Asynchronous copies on `stream` (cudaMemcpyDefault: any pair of host/device pointers).
void copy_async(void* dst, const void* src, size_t bytes, cudaStream_t stream);
/// Rows of `width` bytes: height rows from src (row pitch spitch) to dst (pitch dpitch).
void copy_2d_async(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                   size_t height, cudaStream_t stream);
void memset_async(void* dst, int value, size_t bytes, cudaStream_t stream);
/// Blocking copy between any pair of host/device pointers (cudaMemcpy, cudaMemcpyDefault).
void copy_sync(void* dst, const void* src, size_t bytes);

/// Copies tokens [lo, hi) of a [B, N, H, D] tensor (any strides with a contiguous innermost
/// dimension, host or device) into the contiguous [B, hi-lo, H, D] buffer dst, on `stream`.
void copy_tokens_async(const TensorView& src, int64_t lo, int64_t hi, void* dst,
                       cudaStream_t stream);

}  // namespace ringattn::cuda
