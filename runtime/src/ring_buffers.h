#pragma once
// The sizes of the buffers the ring forward (ring_attention.cc) and backward (ring_backward.cc)
// allocate, as pure functions of the ring plan. The runtime sizes its buffers with these and the
// memory planner (plan.cc) counts them with the same calls, so the two cannot drift. Internal.

#include <cstdint>
#include <vector>

#include "runtime/src/ring_plan.h"

namespace ringattn::detail {

/// The largest key range `rank` folds from any origin's block (sinks excluded; 0 if none): the
/// one-time reserve of the key positions buffer.
int64_t max_need(const RingPlan& plan, int rank);

/// Tokens of the largest range lane `dir` (+1 forward, -1 backward) carries on any hop (0 if the
/// lane has no hops): each of a lane's two receive buffers and its send buffer holds [k; v] of
/// this many tokens.
int64_t lane_tokens(const RingPlan& plan, int dir);

/// The route of the dk/dv accumulators of one direction (ring_backward.cc). For origin o the
/// receivers are o + dir*h at hops h = 1..last(o); acc(o, h) is the hull of the needs of hops
/// 1..h: the key range whose dk/dv the block has accumulated after hop h.
class GradRoutes {
 public:
  /// hops: the lane's hop count (plan.forward_hops() or plan.backward_hops()).
  GradRoutes(const RingPlan& plan, int dir, int hops);
  /// Empty for hop = 0 or hop past last(origin).
  IndexRange acc(int origin, int hop) const;
  /// The farthest hop whose receiver needs anything of origin's block; 0 if none.
  int last(int origin) const { return last_[static_cast<size_t>(origin)]; }
  /// Tokens of the largest acc over every origin and hop: the size of a travelling buffer.
  int64_t max_tokens() const;
  /// Tokens of this rank's own accumulators coming home (acc(rank, last(rank))), 0 if none.
  int64_t home_tokens(int rank) const { return acc(rank, last(rank)).size(); }

 private:
  int world_, hops_;
  std::vector<IndexRange> acc_;
  std::vector<int> last_;
};

}  // namespace ringattn::detail
