#pragma once
/// Accounting of the memory the runtime allocates: every buffer the runtime owns (ring
/// buffers, softmax state, sink copy, KV cache, kernel workspace) is allocated through this
/// header, so the memory planner can be checked against what really happened. Counters are
/// process-wide and per device (one process is one rank under mpirun). Thread-safe.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <vector>

#include "ringattn/tensor.h"

namespace ringattn {

/// Bytes currently held and the high-water mark, for one device.
struct MemoryStats {
  int64_t current_bytes = 0;
  int64_t peak_bytes = 0;
  int64_t allocations = 0;  ///< allocations made since the process started
};

/// The counters of one device.
MemoryStats memory_stats(Device device = Device::kCPU);

/// Starts a measured region: peak := current.
void reset_memory_peak(Device device = Device::kCPU);

namespace detail {
void account_alloc(Device device, size_t bytes);
void account_free(Device device, size_t bytes);
}  // namespace detail

/// A std allocator for host memory that counts every byte under Device::kCPU.
template <typename T>
struct AccountingAllocator {
  using value_type = T;
  AccountingAllocator() noexcept = default;
  template <typename U>
  AccountingAllocator(const AccountingAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    T* p = std::allocator<T>().allocate(n);
    detail::account_alloc(Device::kCPU, n * sizeof(T));
    return p;
  }
  void deallocate(T* p, size_t n) noexcept {
    detail::account_free(Device::kCPU, n * sizeof(T));
    std::allocator<T>().deallocate(p, n);
  }
  template <typename U>
  bool operator==(const AccountingAllocator<U>&) const noexcept {
    return true;
  }
  template <typename U>
  bool operator!=(const AccountingAllocator<U>&) const noexcept {
    return false;
  }
};

/// The runtime's host buffer type: a std::vector whose bytes are accounted.
template <typename T>
using HostVector = std::vector<T, AccountingAllocator<T>>;

}  // namespace ringattn
