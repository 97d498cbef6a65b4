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

#include "kernels/cpu/attention_cpu.h"
#include "ringattn/memory.h"
#include "ringattn/ring.h"
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

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Every rank contributes the fields that must agree; one MAX allreduce of (x, -x) gives each
// field's max and min, so a mismatch names the field on every rank.
void agree_configuration(Communicator& comm, const AttentionSpec& spec, Layout layout,
                         int64_t seq_len, const AttentionShape& s, DType dtype, bool has_sink) {
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
  BlockCodec(int64_t batch, int64_t kv_heads, int64_t head_dim, DType dtype)
      : batch_(batch), kv_heads_(kv_heads), head_dim_(head_dim), dtype_(dtype) {}

  size_t bytes(int64_t tokens) const {
    return 2 * static_cast<size_t>(batch_ * tokens * kv_heads_ * head_dim_) * dtype_size(dtype_);
  }

  // A contiguous buffer holding k then v of `range.size()` tokens.
  Block view(char* buffer, int origin, IndexRange range) const {
    Block b;
    b.origin = origin;
    b.range = range;
    const int64_t len = range.size();
    b.k = TensorView(buffer, dtype_, {batch_, len, kv_heads_, head_dim_});
    b.v = TensorView(buffer + bytes(len) / 2, dtype_, {batch_, len, kv_heads_, head_dim_});
    return b;
  }

  // Copies tokens `sub` (origin-local indices inside src.range) of src into dst, as view().
  void pack(const Block& src, IndexRange sub, char* dst) const {
    const size_t es = dtype_size(dtype_);
    const size_t row = static_cast<size_t>(head_dim_) * es;
    char* out = dst;
    for (const TensorView* t : {&src.k, &src.v}) {
      const char* base = static_cast<const char*>(t->data());
      for (int64_t b = 0; b < batch_; ++b) {
        for (int64_t n = sub.lo; n < sub.hi; ++n) {
          const int64_t ln = n - src.range.lo;
          if (t->stride(2) == head_dim_) {  // all heads of a token are one run
            const int64_t off = b * t->stride(0) + ln * t->stride(1);
            std::memcpy(out, base + off * es, row * kv_heads_);
            out += row * kv_heads_;
          } else {
            for (int64_t h = 0; h < kv_heads_; ++h) {
              const int64_t off = b * t->stride(0) + ln * t->stride(1) + h * t->stride(2);
              std::memcpy(out, base + off * es, row);
              out += row;
            }
          }
        }
      }
    }
  }

 private:
  int64_t batch_, kv_heads_, head_dim_;
  DType dtype_;
};

// One direction of the ring.
struct Lane {
  int dir = 1;  // +1 forward (r -> r+1), -1 backward (r -> r-1)
  int hops = 0;
  int tag = 0;
  int send_peer = 0, recv_peer = 0;
  HostVector<char> recv_buf[2];
  int spare = 0;
  HostVector<char> send_buf;
  Block held;  // the block this rank holds at the current step
  // The transfer in flight for the next hop.
  RequestPtr send_req, recv_req;
  Block incoming;
};

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
    RINGATTN_CHECK(shape.q_len == shape.kv_len, "q holds ", shape.q_len, " tokens but k holds ",
                   shape.kv_len, ": the ring needs each rank's q, k and v shards to match");
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, q.device() == Device::kCPU, "the ring forward on ",
                        device_name(q.device()),
                        " tensors needs the CUDA backend, which this build does not provide");
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, comm.accepts(q.device()), "the ", comm.name(),
                        " communicator does not accept ", device_name(q.device()), " buffers");
    layout = resolve_layout(spec.layout, spec.causal, spec.window);
    check_sharding(seq_len, world, layout, spec.sinks);
    const Shard shard = make_shard(seq_len, world, rank, layout);
    RINGATTN_CHECK(shard.size() == shape.q_len, "q holds ", shape.q_len, " tokens but the ",
                   layout_name(layout), " shard of rank ", rank, " of ", world, " for N=", seq_len,
                   " holds ", shard.size());
  });
  agree_configuration(comm, spec, layout, seq_len, shape, q.dtype(), has_sink);
  st.agree_s = seconds_since(t_start);

  const RingGeometry geometry{seq_len, world, layout, spec.causal, spec.window, spec.sinks};
  const RingPlan plan(geometry);
  const Shard& my_shard = plan.shard(rank);
  const int64_t n_local = my_shard.size();
  HostVector<int64_t> q_pos(static_cast<size_t>(n_local));
  my_shard.positions(0, n_local, q_pos.data());
  HostVector<int64_t> k_pos;

  cpu::SoftmaxStateCpu state(shape.batch, n_local, shape.heads, shape.head_dim);
  const BlockCodec codec(shape.batch, shape.kv_heads, shape.head_dim, q.dtype());

  auto fold = [&](const Block& blk, IndexRange need) {
    if (!blk.valid() || need.empty()) {
      ++st.blocks_skipped;
      return;
    }
    const int64_t off = need.lo - blk.range.lo;
    const TensorView kb = blk.k.slice(1, off, off + need.size());
    const TensorView vb = blk.v.slice(1, off, off + need.size());
    k_pos.resize(static_cast<size_t>(need.size()));
    plan.shard(blk.origin).positions(need.lo, need.hi, k_pos.data());
    const Clock::time_point t0 = Clock::now();
    const cpu::FoldStats fs =
        cpu::fold_block(spec, q, q_pos.data(), kb, vb, k_pos.data(), state, options.num_threads);
    st.compute_s += seconds_since(t0);
    st.tiles_computed += fs.tiles_computed;
    st.tiles_skipped += fs.tiles_skipped;
    st.flops += fs.flops;
    ++st.blocks_computed;
  };

  // 2. The sink block: the owner (rank 0, whose first run starts at position 0) broadcasts
  // [k; v] of positions 0..S-1; everyone folds it first. The plan never carries those keys.
  if (spec.sinks > 0) {
    const Clock::time_point t0 = Clock::now();
    HostVector<char> sink_buf(codec.bytes(spec.sinks));
    if (rank == 0) {
      Block local;
      local.origin = 0;
      local.range = IndexRange{0, n_local};
      local.k = k;
      local.v = v;
      codec.pack(local, IndexRange{0, spec.sinks}, sink_buf.data());
      st.bytes_sent += world > 1 ? sink_buf.size() : 0;
    } else {
      st.bytes_received += sink_buf.size();
    }
    comm.broadcast(sink_buf.data(), sink_buf.size(), 0);
    st.broadcast_s = seconds_since(t0);
    const Block sinks = codec.view(sink_buf.data(), 0, IndexRange{0, spec.sinks});
    HostVector<int64_t> sink_pos(static_cast<size_t>(spec.sinks));
    for (int64_t j = 0; j < spec.sinks; ++j) sink_pos[j] = j;
    const Clock::time_point t1 = Clock::now();
    const cpu::FoldStats fs = cpu::fold_block(spec, q, q_pos.data(), sinks.k, sinks.v,
                                              sink_pos.data(), state, options.num_threads);
    st.compute_s += seconds_since(t1);
    st.tiles_computed += fs.tiles_computed;
    st.tiles_skipped += fs.tiles_skipped;
    st.flops += fs.flops;
    ++st.blocks_computed;
  }

  // 3. The ring.
  Block local;
  local.origin = rank;
  local.range = IndexRange{0, n_local};
  local.k = k;
  local.v = v;

  std::vector<Lane> lanes;
  for (int dir : {+1, -1}) {
    const int hops = dir > 0 ? plan.forward_hops() : plan.backward_hops();
    if (hops == 0) continue;
    Lane lane;
    lane.dir = dir;
    lane.hops = hops;
    lane.tag = dir > 0 ? 1 : 2;
    lane.send_peer = (rank + dir + world) % world;
    lane.recv_peer = (rank - dir + world) % world;
    // Size the buffers for the largest range this lane ever carries.
    int64_t max_tokens = 0;
    for (int origin = 0; origin < world; ++origin) {
      for (int hop = 1; hop <= hops; ++hop) {
        max_tokens = std::max(max_tokens, plan.carried(origin, dir, hop).size());
      }
    }
    lane.recv_buf[0].resize(codec.bytes(max_tokens));
    lane.recv_buf[1].resize(codec.bytes(max_tokens));
    lane.send_buf.resize(codec.bytes(max_tokens));
    lane.held = local;
    lanes.push_back(std::move(lane));
  }

  const int steps = plan.steps();
  st.ring_steps = steps;
  for (int s = 0; s <= steps; ++s) {
    // Post hop s+1.
    for (Lane& lane : lanes) {
      if (s + 1 > lane.hops) continue;
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
        RINGATTN_CHECK_CODE(
            ErrorCode::kInternal,
            lane.held.range.lo <= send_range.lo && send_range.hi <= lane.held.range.hi,
            "ring plan asks to forward tokens [", send_range.lo, ", ", send_range.hi,
            ") of origin ", lane.held.origin, " but this rank holds only [", lane.held.range.lo,
            ", ", lane.held.range.hi, ")");
        const Clock::time_point t0 = Clock::now();
        codec.pack(lane.held, send_range, lane.send_buf.data());
        st.pack_s += seconds_since(t0);
        lane.send_req = comm.isend(lane.send_buf.data(), codec.bytes(send_range.size()),
                                   lane.send_peer, lane.tag);
        st.bytes_sent += codec.bytes(send_range.size());
      }
    }
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
    for (Lane& lane : lanes) {
      if (s + 1 > lane.hops) continue;
      wait(lane.send_req);
      wait(lane.recv_req);
      lane.send_req.reset();
      lane.recv_req.reset();
      lane.held = lane.incoming;
      if (lane.held.valid()) lane.spare ^= 1;
    }
    st.comm_wait_s += seconds_since(t0);
  }

  // 4. Finalise: o = acc / l with the learned sink term, lse.
  const Clock::time_point t0 = Clock::now();
  cpu::finalize(state, has_sink ? sink_logits : nullptr, o, lse);
  st.compute_s += seconds_since(t0);
  st.total_s = seconds_since(t_start);
  return st;
}

}  // namespace ringattn
