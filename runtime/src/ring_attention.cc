// The ring forward (SPEC section 4): agree, broadcast the sinks, then the double-buffered ring.
//
// Step s of the loop (s = 0 is the local step) does, per direction ("lane"):
//   post hop s+1: receive origin r -/+ (s+1) from the previous rank into the spare buffer,
//                 send the part of the block we hold now that the next ranks still need;
//   compute:      fold the part of the block we hold now that our queries need;
//   wait:         both transfers of hop s+1; the received buffer becomes the block we hold.
// The plan (ring_plan.h) is a pure function every rank evaluates alike, so sender and receiver
// always agree on origins and byte counts without exchanging any metadata.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <vector>

#include "ringattn/memory.h"
#include "ringattn/ring.h"
#include "runtime/src/ring_buffers.h"
#include "runtime/src/ring_common.h"
#include "runtime/src/ring_engine.h"
#include "runtime/src/ring_plan.h"

namespace ringattn {
namespace detail {

void agree_status(Communicator& comm, bool failed, ErrorCode code, const std::string& message) {
  int64_t first_failed = failed ? comm.rank() : comm.size();
  comm.allreduce(&first_failed, 1, ReduceType::kI64, ReduceOp::kMin);
  if (first_failed == comm.size()) return;
  const int root = static_cast<int>(first_failed);
  // One fixed-size record: [int32 code][message, NUL-terminated, truncated].
  std::array<char, 1024> record{};
  if (comm.rank() == root) {
    const int32_t c = static_cast<int32_t>(code);
    std::memcpy(record.data(), &c, sizeof(c));
    std::strncpy(record.data() + sizeof(c), message.c_str(), record.size() - sizeof(c) - 1);
  }
  comm.broadcast(record.data(), record.size(), root);
  int32_t c = 0;
  std::memcpy(&c, record.data(), sizeof(c));
  record.back() = '\0';
  std::string text(record.data() + sizeof(c));
  if (comm.rank() != root) text += " (reported by rank " + std::to_string(root) + ")";
  throw AgreedError(static_cast<ErrorCode>(c), text);
}

}  // namespace detail

namespace {

using detail::agree_configuration;
using detail::Block;
using detail::BlockCodec;
using detail::fold_need;
using detail::fold_sinks;
using detail::local_block;
using detail::check_ring_shard;
using detail::Clock;
using detail::complete_hop;
using detail::Lane;
using detail::make_lanes;
using detail::post_hop;
using detail::seconds_since;

}  // namespace

RingStats forward(Communicator& comm, const AttentionSpec& spec, int64_t seq_len,
                  const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView* sink_logits, const TensorView& o, const TensorView* lse,
                  const RingOptions& options) {
  const Clock::time_point t_start = Clock::now();
  RingStats st;
  const int rank = comm.rank(), world = comm.size();
  AttentionShape shape;
  Layout layout = Layout::kContiguous;
  const bool has_sink = sink_logits != nullptr && sink_logits->data() != nullptr;

  // 1. Validate locally, agree on success everywhere, then agree on the configuration.
  agree(comm, [&] {
    shape = check_attention_args(spec, q, k, v, &o, lse, sink_logits);
    layout = check_ring_shard(comm, spec, seq_len, shape, q.device(), "forward");
  });
  agree_configuration(comm, spec, layout, seq_len, shape, q.dtype(), has_sink);
  st.agree_s = seconds_since(t_start);

  const RingGeometry geometry{seq_len, world, layout, spec.causal, spec.window, spec.sinks};
  const RingPlan plan(geometry);
  const int64_t n_local = plan.shard(rank).size();
  detail::RankPositions positions(plan, rank);
  const HostVector<int64_t>& q_pos = positions.q_pos;
  HostVector<int64_t>& k_pos = positions.k_pos;

  const std::unique_ptr<detail::RingEngine> engine =
      detail::make_engine(q.device(), options.num_threads);
  engine->begin_forward(shape.batch, n_local, shape.heads, shape.head_dim, q_pos.data());
  const BlockCodec codec(shape.batch, shape.kv_heads, shape.head_dim, q.dtype(), q.device());

  auto fold = [&](const Block& blk, IndexRange need) {
    fold_need(plan, blk, need, k_pos, st,
              [&](const TensorView& kb, const TensorView& vb, const int64_t* kp) {
                return engine->fold(spec, q, kb, vb, kp);
              });
  };

  // 2. The sink block: the owner (rank 0, whose first run starts at position 0) broadcasts
  // [k; v] of positions 0..S-1; everyone folds it first. The plan never carries those keys.
  if (spec.sinks > 0) {
    fold_sinks(comm, *engine, codec, k, v, spec.sinks, st,
               [&](const TensorView& sk, const TensorView& sv, const int64_t* sp) {
                 return engine->fold(spec, q, sk, sv, sp);
               });
  }

  // 3. The ring.
  const Block local = local_block(rank, k, v);

  std::vector<Lane> lanes = make_lanes(*engine, plan, codec, rank, local, /*tag_base=*/1);

  const int steps = plan.steps();
  st.ring_steps = steps;
  for (int s = 0; s <= steps; ++s) {
    CommGroup hops(comm);  // the sends and receives of a hop launch together (NCCL)
    for (Lane& lane : lanes) post_hop(comm, *engine, plan, codec, rank, s, lane, st);
    hops.end();
    // Compute the blocks held at step s.
    if (s == 0) {
      fold(local, plan.need(rank, rank));
    } else {
      for (Lane& lane : lanes) {
        if (s <= lane.hops) fold(lane.held, plan.need(rank, lane.held.origin));
      }
    }
    // Complete hop s+1: the received block is the one held at the next step.
    const Clock::time_point t0 = Clock::now();
    for (Lane& lane : lanes) complete_hop(s, lane);
    st.comm_wait_s += seconds_since(t0);
    // The next step may receive into the buffer folded now: queued folds must be done.
    const Clock::time_point t1 = Clock::now();
    engine->sync();
    st.compute_s += seconds_since(t1);
  }

  // 4. Finalise: o = acc / l with the learned sink term, lse.
  const Clock::time_point t0 = Clock::now();
  engine->finalize(has_sink ? sink_logits : nullptr, o, lse);
  st.compute_s += seconds_since(t0);
  st.total_s = seconds_since(t_start);
  return st;
}

}  // namespace ringattn
