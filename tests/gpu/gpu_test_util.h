#pragma once
// Shared by the GPU tests: skip without a device, blocking uploads and downloads of host
// vectors. Host-only helpers (inputs, errors, shards) are in tests/common/test_util.h.

#include <gtest/gtest.h>

#include <vector>

#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/device.h"

/// Skips the calling test (reported as skipped by ctest) when no CUDA device is visible.
#define RINGATTN_REQUIRE_GPU()                                                   \
  do {                                                                           \
    if (::ringattn::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

namespace ringattn::test {

/// A device copy of `host`, on stream s; returns once the copy landed (work queued on s before
/// it runs first; the copy is ordered for any stream after the return).
template <typename T>
cuda::DeviceBuffer upload(const std::vector<T>& host, const cuda::Stream& s) {
  cuda::DeviceBuffer buf(host.size() * sizeof(T));
  cuda::copy_async(buf.data(), host.data(), buf.size(), s.get());
  s.synchronize();
  return buf;
}

/// The whole buffer as host values of T, copied on stream s after the work queued on it
/// (blocking).
template <typename T>
std::vector<T> download(const cuda::DeviceBuffer& buf, const cuda::Stream& s) {
  std::vector<T> host(buf.size() / sizeof(T));
  cuda::copy_async(host.data(), buf.data(), buf.size(), s.get());
  s.synchronize();
  return host;
}

}  // namespace ringattn::test
