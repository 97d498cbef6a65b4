#pragma once
/// The ring plan: a pure function of (world, layout, N, causal, window, sinks) that every rank
/// evaluates identically, so no plan is ever exchanged.
///
/// Blocks travel in two directions. Forward: at hop s (1..forward_hops) rank r receives the
/// block of origin r-s from rank r-1 and sends the block of origin r-s+1 (which it received at
/// hop s-1, or its own at s = 1) to rank r+1. Backward (only for non-causal windows): the
/// mirror image, origin r+s arriving from rank r+1. A hop carries only the part of the origin's
/// block that the receiver or a rank further along still needs, so with a window the bytes
/// moved per rank are O(W + S), independent of N, and the ring stops after the farthest hop
/// any rank needs. The S global sink tokens are never carried: they are broadcast once and
/// folded first on every rank, so they are excluded from every need and carried range.

#include <cstdint>
#include <vector>

#include "runtime/src/sharding.h"

namespace ringattn {

/// Everything the plan depends on. `layout` must be resolved (contiguous or zigzag).
struct RingGeometry {
  int64_t seq_len = 0;
  int world = 1;
  Layout layout = Layout::kContiguous;
  bool causal = false;
  int64_t window = 0;
  int64_t sinks = 0;
};

/// Local token indices [lo, hi) of an origin's shard.
struct IndexRange {
  int64_t lo = 0, hi = 0;
  bool empty() const { return hi <= lo; }
  int64_t size() const { return hi > lo ? hi - lo : 0; }
};

class RingPlan {
 public:
  /// Validates (check_sharding) and plans. Cost O(P^2) in time and memory.
  explicit RingPlan(const RingGeometry& geometry);

  const RingGeometry& geometry() const { return g_; }
  int world() const { return g_.world; }
  /// Number of forward hops F (0..P-1).
  int forward_hops() const { return forward_hops_; }
  /// Number of backward hops (0 unless a non-causal window makes two short rings cheaper
  /// than one full lap; always forward_hops + backward_hops <= P - 1).
  int backward_hops() const { return backward_hops_; }
  /// Steps of the ring loop after the local step 0: max(forward, backward hops).
  int steps() const { return forward_hops_ > backward_hops_ ? forward_hops_ : backward_hops_; }

  const Shard& shard(int rank) const { return shards_[rank]; }
  /// Largest shard (receive buffers are sized for it).
  int64_t max_shard() const { return max_shard_; }

  /// Local indices of origin's block that receiver must fold: the hull of the keys visible to
  /// any of receiver's queries, sinks excluded. Empty: receiver computes nothing for origin.
  IndexRange need(int receiver, int origin) const { return need_[receiver * g_.world + origin]; }

  /// Origin of the block rank `rank` holds at step s in direction dir (+1 forward, -1
  /// backward): (rank - s) mod P forward, (rank + s) mod P backward.
  int origin_at(int rank, int dir, int step) const;

  /// Part of origin's block carried on hop `hop` (1-based) in direction dir: the hull of
  /// need(receiver, origin) over this hop's receiver and every receiver after it in that
  /// direction. Nested: carried(o, d, s+1) lies inside carried(o, d, s). Empty, or hop past
  /// the direction's hop count: no message is sent.
  IndexRange carried(int origin, int dir, int hop) const;

  /// Direction in which origin's block reaches receiver: +1 forward (at hop (receiver -
  /// origin) mod P), -1 backward (at hop (origin - receiver) mod P), 0 when receiver == origin
  /// (the local step) or need(receiver, origin) is empty (nothing travels for this pair).
  int route(int receiver, int origin) const;

  /// Sum over hops of the tokens `rank` sends (both directions).
  int64_t tokens_sent(int rank) const;

 private:
  RingGeometry g_;
  std::vector<Shard> shards_;
  std::vector<IndexRange> need_;  // [receiver * P + origin]
  // carried_[dir][origin * (P) + hop], dir 0 forward, 1 backward; hop 0 unused.
  std::vector<IndexRange> carried_[2];
  int forward_hops_ = 0, backward_hops_ = 0;
  // Non-causal window routed in two directions: origin < receiver forward, otherwise backward.
  bool two_way_ = false;
  int64_t max_shard_ = 0;
};

}  // namespace ringattn
