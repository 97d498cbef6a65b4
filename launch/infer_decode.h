#pragma once
/// The decode half of `ringattn infer`: one distributed KV cache per layer, filled by the
/// prefill, then `--decode-tokens T` (after a prefill) or `--stream-tokens N` (streaming mode,
/// constant memory) synthetic tokens decoded one at a time through every layer. Reports
/// per-token latency (p50/p99), tokens/s, and memory per rank at the start and the end of
/// decoding (accounted bytes from memory_stats of the cache's device, and the resident set).

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "launch/common.h"
#include "ringattn/kv_cache.h"

namespace ringattn::launch {

/// Per-token latencies in a fixed log-spaced histogram (constant memory for any count):
/// 1000 bins per decade from 1 us to 100 s, so percentiles are within 0.25%.
class LatencyHistogram {
 public:
  LatencyHistogram();
  void add(double seconds);
  /// The q-quantile (0..1) in seconds; 0 when empty.
  double quantile(double q) const;
  int64_t count() const { return count_; }

 private:
  std::vector<int64_t> bins_;
  int64_t count_ = 0;
};

/// What the decode phase needs to know about the problem.
struct DecodeSetup {
  KVCacheConfig cache;  ///< one layer's cache (prefill_len, max_len and mask filled in)
  int layers = 1;
  int64_t tokens = 0;      ///< tokens to decode after the prefill
  bool streaming = false;  ///< --stream-tokens: print memory as it goes
  int64_t report_every = 0;
  uint64_t seed = 1;
};

class InferDecode {
 public:
  /// Allocates one cache per layer (capacity fixed here, before the first token).
  InferDecode(Communicator& comm, const DecodeSetup& setup);
  /// The cache of a layer, for its prefill.
  KVCache& cache(int layer) { return *caches_[static_cast<size_t>(layer)]; }
  /// Decodes setup.tokens synthetic tokens through every layer; rank 0 prints progress (and
  /// in streaming mode the memory every report_every tokens). Collective.
  void run();
  /// Rank 0 prints the summary table; every rank must call it (it gathers per-rank figures).
  Json report();

 private:
  Communicator& comm_;
  DecodeSetup setup_;
  std::vector<std::unique_ptr<KVCache>> caches_;
  LatencyHistogram latency_;
  double wall_s_ = 0.0, checksum_ = 0.0, compute_s_ = 0.0, merge_s_ = 0.0;
  int64_t mem_start_ = 0, mem_end_ = 0, mem_peak_ = 0, rss_start_ = 0, rss_end_ = 0;
  int64_t mem_min_ = 0, mem_max_ = 0;  // accounted bytes over the periodic reports
};

}  // namespace ringattn::launch
