#pragma once
/// Sharding of a global sequence of N tokens over P ranks (SPEC section 3).
/// Nothing has to divide evenly: any N >= P is accepted.

#include <cstdint>
#include <vector>

#include "ringattn/attention.h"

namespace ringattn {

/// A run of consecutive global positions [begin, end).
struct PosRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};

/// The tokens one rank holds: runs of global positions in local order (one run for
/// contiguous, the two chunks r and 2P-1-r for zigzag; empty runs are dropped).
struct Shard {
  std::vector<PosRange> runs;
  /// Number of local tokens.
  int64_t size() const;
  /// Global position of local token `local` (0 <= local < size()).
  int64_t position(int64_t local) const;
  /// Writes the global positions of local tokens [lo, hi) to out[0 .. hi-lo).
  void positions(int64_t lo, int64_t hi, int64_t* out) const;
  /// Local index of a global position, or -1 when this shard does not hold it.
  int64_t local_index(int64_t global) const;
};

/// `auto` resolves to zigzag for causal attention with no window, contiguous otherwise.
Layout resolve_layout(Layout layout, bool causal, int64_t window);

/// Throws Error (before any communication) when N < P, P < 1, or the S sink tokens do not
/// all sit in rank 0's first run (the sink owner broadcasts them as one block).
void check_sharding(int64_t seq_len, int world, Layout resolved_layout, int64_t sinks);

/// The shard of `rank` for a resolved layout (kContiguous or kZigzag).
Shard make_shard(int64_t seq_len, int world, int rank, Layout resolved_layout);

}  // namespace ringattn
