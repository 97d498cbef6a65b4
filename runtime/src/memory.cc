#include "ringattn/memory.h"

#include <atomic>

namespace ringattn {
namespace {

struct Counters {
  std::atomic<int64_t> current{0};
  std::atomic<int64_t> peak{0};
  std::atomic<int64_t> allocations{0};
};

Counters& counters(Device device) {
  static Counters per_device[2];
  return per_device[device == Device::kCUDA ? 1 : 0];
}

}  // namespace

MemoryStats memory_stats(Device device) {
  Counters& c = counters(device);
  MemoryStats s;
  s.current_bytes = c.current.load();
  s.peak_bytes = c.peak.load();
  s.allocations = c.allocations.load();
  return s;
}

void reset_memory_peak(Device device) {
  Counters& c = counters(device);
  c.peak.store(c.current.load());
}

namespace detail {

void account_alloc(Device device, size_t bytes) {
  Counters& c = counters(device);
  const int64_t now = c.current.fetch_add(static_cast<int64_t>(bytes)) + static_cast<int64_t>(bytes);
  c.allocations.fetch_add(1);
  int64_t peak = c.peak.load();
  while (now > peak && !c.peak.compare_exchange_weak(peak, now)) {
  }
}

void account_free(Device device, size_t bytes) {
  counters(device).current.fetch_sub(static_cast<int64_t>(bytes));
}

}  // namespace detail
}  // namespace ringattn
