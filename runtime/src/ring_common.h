#pragma once
// Pieces shared by the ring forward (ring_attention.cc) and backward (ring_backward.cc): timing,
// the configuration agreement, the K/V block codec and one direction of the ring. Internal.

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "ringattn/config.h"
#include "ringattn/memory.h"
#include "ringattn/ring.h"
#include "runtime/src/ring_buffers.h"
#include "runtime/src/ring_engine.h"
#include "runtime/src/ring_plan.h"

namespace ringattn::detail {

using Clock = std::chrono::steady_clock;

/// What both passes hold besides their buffers: this rank's query positions and a key-position
/// buffer reserved once for the largest block the rank folds (the memory planner counts exactly
/// these two; a buffer that grew per block would make the peak depend on the fold order).
struct RankPositions {
  RankPositions(const RingPlan& plan, int rank) {
    const Shard& shard = plan.shard(rank);
    q_pos.resize(static_cast<size_t>(shard.size()));
    shard.positions(0, shard.size(), q_pos.data());
    k_pos.reserve(static_cast<size_t>(max_need(plan, rank)));
  }
  HostVector<int64_t> q_pos, k_pos;
};

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Every rank contributes the fields that must agree; one MAX allreduce of (x, -x) gives each
// field's max and min, so a mismatch names the field on every rank.
inline void agree_configuration(Communicator& comm, const AttentionSpec& spec, Layout layout,
                                int64_t seq_len, const AttentionShape& s, DType dtype,
                                bool has_sink) {
  float scale = spec.scale;
  int32_t scale_bits = 0;
  std::memcpy(&scale_bits, &scale, sizeof(scale_bits));
  const char* names[] = {"seq_len",
                         "batch",
                         "heads",
                         "kv_heads",
                         "head_dim",
                         "dtype",
                         "causal",
                         "window",
                         "sinks",
                         "layout",
                         "sink_logits present",
                         "scale"};
  constexpr int kFields = 12;
  const int64_t fields[kFields] = {seq_len,
                                   s.batch,
                                   s.heads,
                                   s.kv_heads,
                                   s.head_dim,
                                   static_cast<int64_t>(dtype),
                                   spec.causal ? 1 : 0,
                                   spec.window,
                                   spec.sinks,
                                   static_cast<int64_t>(layout),
                                   has_sink ? 1 : 0,
                                   scale_bits};
  int64_t mm[2 * kFields];
  for (int i = 0; i < kFields; ++i) {
    mm[i] = fields[i];
    mm[kFields + i] = -fields[i];
  }
  comm.allreduce(mm, 2 * kFields, ReduceType::kI64, ReduceOp::kMax);
  std::string diff;
  for (int i = 0; i < kFields; ++i) {
    if (mm[i] != -mm[kFields + i]) {
      diff += detail::str_cat(diff.empty() ? "" : ", ", names[i], " (min ", -mm[kFields + i],
                              ", max ", mm[i], ", here ", fields[i], ")");
    }
  }
  // Every rank sees the same reduced values, so every rank throws together.
  if (!diff.empty()) {
    throw AgreedError(ErrorCode::kInvalidArgument, "configuration mismatch across ranks: " + diff);
  }
}

// A K/V block of one origin: tokens [range.lo, range.hi) of the origin's shard.
struct Block {
  int origin = -1;
  IndexRange range;
  TensorView k, v;  // [B, range.size(), H_kv, D]
  bool valid() const { return origin >= 0 && !range.empty(); }
};

class BlockCodec {
 public:
  BlockCodec(int64_t batch, int64_t kv_heads, int64_t head_dim, DType dtype,
             Device device = Device::kCPU)
      : batch_(batch), kv_heads_(kv_heads), head_dim_(head_dim), dtype_(dtype), device_(device) {}

  size_t bytes(int64_t tokens) const {
    return 2 * static_cast<size_t>(batch_ * tokens * kv_heads_ * head_dim_) * dtype_size(dtype_);
  }

  // A contiguous buffer holding k then v of `range.size()` tokens.
  Block view(char* buffer, int origin, IndexRange range) const {
    Block b;
    b.origin = origin;
    b.range = range;
    const int64_t len = range.size();
    b.k = TensorView(buffer, dtype_, {batch_, len, kv_heads_, head_dim_}, device_);
    b.v = TensorView(buffer + bytes(len) / 2, dtype_, {batch_, len, kv_heads_, head_dim_}, device_);
    return b;
  }

 private:
  int64_t batch_, kv_heads_, head_dim_;
  DType dtype_;
  Device device_;
};

// One direction of the ring.
struct Lane {
  int dir = 1;  // +1 forward (r -> r+1), -1 backward (r -> r-1)
  int hops = 0;
  int tag = 0;
  int send_peer = 0, recv_peer = 0;
  ByteBuffer recv_buf[2];
  int spare = 0;
  ByteBuffer send_buf;
  Block held;  // the block this rank holds at the current step
  // The transfer in flight for the next hop.
  RequestPtr send_req, recv_req;
  Block incoming;
};

// The lanes (directions) of the plan that run at least one hop, holding `local` at step 0. A
// lane's messages use tag tag_base (forward) or tag_base + 1 (backward direction).
inline std::vector<Lane> make_lanes(RingEngine& engine, const RingPlan& plan,
                                    const BlockCodec& codec, int rank, const Block& local,
                                    int tag_base) {
  const int world = plan.world();
  std::vector<Lane> lanes;
  for (int dir : {+1, -1}) {
    const int hops = dir > 0 ? plan.forward_hops() : plan.backward_hops();
    if (hops == 0) continue;
    Lane lane;
    lane.dir = dir;
    lane.hops = hops;
    lane.tag = dir > 0 ? tag_base : tag_base + 1;
    lane.send_peer = (rank + dir + world) % world;
    lane.recv_peer = (rank - dir + world) % world;
    // Size the buffers for the largest range this lane ever carries (the planner's figure).
    const int64_t max_tokens = lane_tokens(plan, dir);
    for (ByteBuffer* b : {&lane.recv_buf[0], &lane.recv_buf[1], &lane.send_buf}) {
      *b = engine.buffer(codec.bytes(max_tokens));
    }
    lane.held = local;
    lanes.push_back(std::move(lane));
  }
  return lanes;
}

// Posts hop s+1 of a lane: receive the next origin's carried range into the spare buffer, and
// pack and send the part of the held block that the next ranks still need.
inline void post_hop(Communicator& comm, RingEngine& engine, const RingPlan& plan,
                     const BlockCodec& codec, int rank, int s, Lane& lane, RingStats& st) {
  if (s + 1 > lane.hops) return;
  const int next_origin = plan.origin_at(rank, lane.dir, s + 1);
  const IndexRange recv_range = plan.carried(next_origin, lane.dir, s + 1);
  lane.incoming = Block{};
  lane.incoming.origin = next_origin;
  if (!recv_range.empty()) {
    lane.incoming = codec.view(lane.recv_buf[lane.spare].data(), next_origin, recv_range);
    lane.recv_req = comm.irecv(lane.recv_buf[lane.spare].data(), codec.bytes(recv_range.size()),
                               lane.recv_peer, lane.tag);
    st.bytes_received += codec.bytes(recv_range.size());
  }
  const IndexRange send_range = plan.carried(lane.held.origin, lane.dir, s + 1);
  if (!send_range.empty()) {
    RINGATTN_CHECK_CODE(ErrorCode::kInternal,
                        lane.held.range.lo <= send_range.lo && send_range.hi <= lane.held.range.hi,
                        "ring plan asks to forward tokens [", send_range.lo, ", ", send_range.hi,
                        ") of origin ", lane.held.origin, " but this rank holds only [",
                        lane.held.range.lo, ", ", lane.held.range.hi, ")");
    const Clock::time_point t0 = Clock::now();
    engine.pack(lane.held.k, lane.held.v, send_range.lo - lane.held.range.lo,
                send_range.hi - lane.held.range.lo, lane.send_buf.data());
    st.pack_s += seconds_since(t0);
    lane.send_req =
        comm.isend(lane.send_buf.data(), codec.bytes(send_range.size()), lane.send_peer, lane.tag);
    st.bytes_sent += codec.bytes(send_range.size());
  }
}

// Completes hop s+1 of a lane: the received block is the one held at the next step.
inline void complete_hop(int s, Lane& lane) {
  if (s + 1 > lane.hops) return;
  wait(lane.send_req);
  wait(lane.recv_req);
  lane.send_req.reset();
  lane.recv_req.reset();
  lane.held = lane.incoming;
  if (lane.held.valid()) lane.spare ^= 1;
}

// The sink block: the owner (rank 0, whose first run starts at position 0) packs [k; v] of
// positions 0..S-1 of its shard k, v into buf and broadcasts it; returns the view of buf that
// every rank then holds. Counts the bytes in st.
inline Block broadcast_sinks(Communicator& comm, RingEngine& engine, const BlockCodec& codec,
                             const TensorView& k, const TensorView& v, int64_t sinks,
                             ByteBuffer& buf, RingStats& st) {
  buf = engine.buffer(codec.bytes(sinks));
  if (comm.rank() == 0) {
    engine.pack(k, v, 0, sinks, buf.data());
    st.bytes_sent += comm.size() > 1 ? buf.size() : 0;
  } else {
    st.bytes_received += buf.size();
  }
  comm.broadcast(buf.data(), buf.size(), 0);
  return codec.view(buf.data(), 0, IndexRange{0, sinks});
}

// Counts one computed fold in the stats.
inline void count_fold(RingStats& st, const cpu::FoldStats& fs) {
  st.tiles_computed += fs.tiles_computed;
  st.tiles_skipped += fs.tiles_skipped;
  st.flops += fs.flops;
  ++st.blocks_computed;
}

// Folds the part `need` (origin-local indices) of a held block, as both passes do at every step:
// fold(k, v, k_pos) gets the keys' views and their global positions (written to k_pos, the
// buffer RankPositions reserved); timed and counted in st. An empty need counts as skipped.
template <typename Fold>
void fold_need(const RingPlan& plan, const Block& blk, IndexRange need, HostVector<int64_t>& k_pos,
               RingStats& st, Fold&& fold) {
  if (!blk.valid() || need.empty()) {
    ++st.blocks_skipped;
    return;
  }
  const int64_t off = need.lo - blk.range.lo;
  k_pos.resize(static_cast<size_t>(need.size()));
  plan.shard(blk.origin).positions(need.lo, need.hi, k_pos.data());
  const Clock::time_point t0 = Clock::now();
  const cpu::FoldStats fs = fold(blk.k.slice(1, off, off + need.size()),
                                 blk.v.slice(1, off, off + need.size()), k_pos.data());
  st.compute_s += seconds_since(t0);
  count_fold(st, fs);
}

// The sink phase of both passes: the owner broadcasts [k; v] of positions 0..S-1
// (broadcast_sinks), every rank folds it once with fold(k, v, positions), and the copy goes
// again before the ring allocates its buffers (after the engine finished reading it).
template <typename Fold>
void fold_sinks(Communicator& comm, RingEngine& engine, const BlockCodec& codec,
                const TensorView& k, const TensorView& v, int64_t sinks, RingStats& st,
                Fold&& fold) {
  const Clock::time_point t0 = Clock::now();
  ByteBuffer buf;
  const Block blk = broadcast_sinks(comm, engine, codec, k, v, sinks, buf, st);
  st.broadcast_s = seconds_since(t0);
  HostVector<int64_t> pos(static_cast<size_t>(sinks));
  for (int64_t j = 0; j < sinks; ++j) pos[static_cast<size_t>(j)] = j;
  const Clock::time_point t1 = Clock::now();
  const cpu::FoldStats fs = fold(blk.k, blk.v, pos.data());
  st.compute_s += seconds_since(t1);
  count_fold(st, fs);
  engine.sync();
}

// The rank's own shard as the block it holds at step 0.
inline Block local_block(int rank, const TensorView& k, const TensorView& v) {
  Block b;
  b.origin = rank;
  b.range = IndexRange{0, k.size(1)};
  b.k = k;
  b.v = v;
  return b;
}

// The checks of a ring call that need the communicator and the global length: q, k and v
// shards of one length, host tensors, and a shard of this rank's size for the resolved layout.
// Run inside agree(). Returns the resolved layout.
inline Layout check_ring_shard(Communicator& comm, const AttentionSpec& spec, int64_t seq_len,
                               const AttentionShape& shape, Device device, const char* what) {
  const int rank = comm.rank(), world = comm.size();
  RINGATTN_CHECK(shape.q_len == shape.kv_len, "q holds ", shape.q_len, " tokens but k holds ",
                 shape.kv_len, ": the ring needs each rank's q, k and v shards to match");
  RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, device == Device::kCPU || RINGATTN_WITH_CUDA,
                      "the ring ", what, " on ", device_name(device),
                      " tensors needs the CUDA backend, which this build does not provide");
  RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, comm.accepts(device), "the ", comm.name(),
                      " communicator does not accept ", device_name(device), " buffers");
  const Layout layout = resolve_layout(spec.layout, spec.causal, spec.window);
  check_sharding(seq_len, world, layout, spec.sinks);
  const Shard shard = make_shard(seq_len, world, rank, layout);
  RINGATTN_CHECK(shard.size() == shape.q_len, "q holds ", shape.q_len, " tokens but the ",
                 layout_name(layout), " shard of rank ", rank, " of ", world, " for N=", seq_len,
                 " holds ", shard.size());
  return layout;
}

}  // namespace ringattn::detail
