// The ring backward (SPEC section 5): agree, broadcast the sinks, then the same double-buffered
// K/V ring as the forward, with each block's dk/dv accumulators travelling behind it.
//
// For origin o in direction d, the receivers are the ranks o + d*h at hops h = 1..last(o, d)
// (last: the farthest hop whose receiver needs anything of o). acc(o, d, h) is the hull of the
// needs of hops 1..h: the key range whose dk/dv the block has accumulated after hop h. Step s
// of the loop (s = 0 is the local step) does, per lane:
//   post:    hop s+1 of K/V exactly as the forward;
//   compute: the held block's need into a fresh f32 partial of range acc(o, d, s) (dq into the
//            local state);
//   add:     wait for the dk/dv of the held block accumulated by hops 1..s-1 (range
//            acc(o, d, s-1), received from the previous rank) and add it into the partial;
//   phase 2: send the partial on to the next rank, or at s = last(o, d) straight back to the
//            owner o (a direct message over the distance: no lap to bring it home, so with a
//            window the bytes stay O(W + S)); post the receive of the partial for step s+1 and,
//            at s = last of this rank's own block, of its return;
//   wait:    K/V hop s+1.
// The dk/dv message of hop s is sent right after the compute of step s and overlaps the compute
// of step s+1 on the next rank, which only adds it in after its own compute.
// Owners add the returned accumulators into their own (local step) dk/dv; the sink block's
// dk/dv and the learned-sink dz are summed over all ranks in one allreduce.

#include <algorithm>
#include <vector>

#include "ringattn/memory.h"
#include "ringattn/ring.h"
#include "runtime/src/ring_buffers.h"
#include "runtime/src/ring_common.h"
#include "runtime/src/ring_engine.h"
#include "runtime/src/ring_plan.h"

namespace ringattn {
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
using detail::GradRoutes;
using detail::Lane;
using detail::make_lanes;
using detail::post_hop;
using detail::seconds_since;

// Tags: K/V lanes 11 (forward) and 12 (backward direction); dk/dv hops 13/14; returns 15/16.
constexpr int kKvTag = 11;
constexpr int kGradTag = 13;
constexpr int kReturnTag = 15;

// f32 dk then dv of `tokens` keys, [B, tokens, H_kv, D] each, in one contiguous buffer on the
// engine's device.
struct GradCodec {
  int64_t batch, kv_heads, head_dim;
  Device device;
  size_t floats(int64_t tokens) const {
    return 2 * static_cast<size_t>(batch * tokens * kv_heads * head_dim);
  }
  TensorView dk(float* buf, int64_t tokens) const {
    return TensorView(buf, DType::kF32, {batch, tokens, kv_heads, head_dim}, device);
  }
  TensorView dv(float* buf, int64_t tokens) const {
    return TensorView(buf + floats(tokens) / 2, DType::kF32, {batch, tokens, kv_heads, head_dim},
                      device);
  }
  // dst (range dst_range, a buffer of this layout) += src (range src_range inside dst_range).
  void add(detail::RingEngine& engine, float* dst, IndexRange dst_range, float* src,
           IndexRange src_range) const {
    const int64_t off = src_range.lo - dst_range.lo, n = src_range.size();
    engine.add(dk(dst, dst_range.size()).slice(1, off, off + n), dk(src, n));
    engine.add(dv(dst, dst_range.size()).slice(1, off, off + n), dv(src, n));
  }
};

// The dk/dv side of one K/V lane.
struct GradLane {
  GradRoutes routes;
  detail::ByteBuffer
      partial[2];  // by step parity: one may still be sending while we fill the other
  RequestPtr send_req[2];
  detail::ByteBuffer recv_buf;
  RequestPtr recv_req;
  detail::ByteBuffer return_buf;  // this rank's own block coming home
  RequestPtr return_req;
};

void check_like(const TensorView& t, const char* name, const TensorView& like,
                const char* like_name) {
  bool same = t.ndim() == like.ndim();
  for (int i = 0; same && i < t.ndim(); ++i) same = t.size(i) == like.size(i);
  RINGATTN_CHECK(same, name, " must have the shape of ", like_name, " ", like.describe(), ", got ",
                 t.describe());
  RINGATTN_CHECK_CODE(
      ErrorCode::kUnsupported,
      t.dtype() == DType::kF32 || t.dtype() == DType::kBF16 || t.dtype() == DType::kF16, name,
      " has unsupported dtype code ", static_cast<int>(t.dtype()), ": expected f32, bf16 or f16");
  RINGATTN_CHECK(t.device() == like.device(), name, " must be on the device of ", like_name);
  RINGATTN_CHECK(t.data() != nullptr || t.numel() == 0, name, " has no data");
  RINGATTN_CHECK(t.numel() == 0 || t.stride(t.ndim() - 1) == 1, name,
                 " needs a contiguous innermost dimension, got ", t.describe());
}

}  // namespace

RingStats backward(Communicator& comm, const AttentionSpec& spec, int64_t seq_len,
                   const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& o, const TensorView& lse, const TensorView& dout,
                   const TensorView* sink_logits, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv, const TensorView* dsink, const RingOptions& options) {
  const Clock::time_point t_start = Clock::now();
  RingStats st;
  const int rank = comm.rank(), world = comm.size();
  AttentionShape shape;
  Layout layout = Layout::kContiguous;
  const bool has_sink = sink_logits != nullptr && sink_logits->data() != nullptr;
  const bool want_dsink = dsink != nullptr && dsink->data() != nullptr;

  // 1. Validate locally, agree on success everywhere, then agree on the configuration.
  agree(comm, [&] {
    shape = check_attention_args(spec, q, k, v, &o, &lse, sink_logits);
    check_like(dout, "dout", q, "q");
    check_like(dq, "dq", q, "q");
    check_like(dk, "dk", k, "k");
    check_like(dv, "dv", v, "v");
    if (want_dsink) {
      RINGATTN_CHECK(dsink->ndim() == 1 && dsink->size(0) == shape.heads &&
                         dsink->dtype() == DType::kF32 && dsink->stride(0) == 1 &&
                         dsink->device() == q.device(),
                     "dsink must be [H] f32 contiguous on the device of q with H=", shape.heads,
                     ", got ", dsink->describe());
    }
    layout = check_ring_shard(comm, spec, seq_len, shape, q.device(), "backward");
  });
  agree_configuration(comm, spec, layout, seq_len, shape, q.dtype(), has_sink);
  st.agree_s = seconds_since(t_start);

  const RingGeometry geometry{seq_len, world, layout, spec.causal, spec.window, spec.sinks};
  const RingPlan plan(geometry);
  const int64_t n_local = plan.shard(rank).size();
  detail::RankPositions positions(plan, rank);
  const HostVector<int64_t>& q_pos = positions.q_pos;
  HostVector<int64_t>& k_pos = positions.k_pos;

  Clock::time_point t0 = Clock::now();
  const std::unique_ptr<detail::RingEngine> engine =
      detail::make_engine(q.device(), options.num_threads);
  engine->begin_backward(o, dout, lse, q_pos.data());
  const BlockCodec codec(shape.batch, shape.kv_heads, shape.head_dim, q.dtype(), q.device());
  const GradCodec grads{shape.batch, shape.kv_heads, shape.head_dim, q.device()};
  // This rank's own dk/dv (f32, [dk; dv] of its whole shard): the local step, the returns and,
  // on rank 0, the sinks' sum are added here.
  detail::ByteBuffer own = engine->buffer(grads.floats(n_local) * sizeof(float));
  engine->zero(own.as<float>(), grads.floats(n_local));
  st.compute_s += seconds_since(t0);

  // Folds the part `need` of a held block into dq and into the f32 accumulators dk_acc, dv_acc
  // whose key 0 is local index acc_lo of the block's origin.
  auto fold = [&](const Block& blk, IndexRange need, const TensorView& dk_acc,
                  const TensorView& dv_acc, int64_t acc_lo) {
    const int64_t a0 = need.lo - acc_lo;
    fold_need(plan, blk, need, k_pos, st,
              [&](const TensorView& kb, const TensorView& vb, const int64_t* kp) {
                return engine->fold_backward(spec, q, kb, vb, kp, dout,
                                             dk_acc.slice(1, a0, a0 + need.size()),
                                             dv_acc.slice(1, a0, a0 + need.size()));
              });
  };

  // 2. The sinks: every rank folds the broadcast block into its own f32 sink dk/dv; these and
  // the local dz are summed over all ranks below.
  detail::ByteBuffer reduced = engine->buffer(0);  // [sink dk; sink dv] then dz [H]
  const size_t sink_floats = grads.floats(spec.sinks);
  const size_t reduced_floats = sink_floats + (has_sink ? shape.heads : 0);
  if (spec.sinks > 0 || has_sink) {
    reduced.resize(reduced_floats * sizeof(float));
    engine->zero(reduced.as<float>(), reduced_floats);
  }
  if (spec.sinks > 0) {
    fold_sinks(comm, *engine, codec, k, v, spec.sinks, st,
               [&](const TensorView& sk, const TensorView& sv, const int64_t* sp) {
                 return engine->fold_backward(spec, q, sk, sv, sp, dout,
                                              grads.dk(reduced.as<float>(), spec.sinks),
                                              grads.dv(reduced.as<float>(), spec.sinks));
               });
  }

  // 3. The ring.
  const Block local = local_block(rank, k, v);
  std::vector<Lane> lanes = make_lanes(*engine, plan, codec, rank, local, kKvTag);
  std::vector<GradLane> glanes;
  for (const Lane& lane : lanes) {
    GradLane g{GradRoutes(plan, lane.dir, lane.hops), {}, {}, {}, {}, {}, {}};
    // The travelling buffers hold the largest acc of any origin; the memory planner counts
    // exactly these (GradRoutes::max_tokens, home_tokens).
    const size_t max_bytes = grads.floats(g.routes.max_tokens()) * sizeof(float);
    for (detail::ByteBuffer* b : {&g.partial[0], &g.partial[1], &g.recv_buf}) {
      *b = engine->buffer(max_bytes);
    }
    // The return of this rank's own block comes from the rank at distance last (posted at
    // step last, see below); its buffer is allocated now, as the planner counts it.
    const int last = g.routes.last(rank);
    if (last > 0) {
      g.return_buf = engine->buffer(grads.floats(g.routes.home_tokens(rank)) * sizeof(float));
    }
    glanes.push_back(std::move(g));
  }

  // Messages are posted in two phases per step, each one communicator group that matches the
  // same phase of the same step on every peer: phase 1 the K/V hops (as the forward), phase 2,
  // after the compute, per lane in lane order, the dk/dv partial going on (or home) and the
  // receives of the partial added at the next step and of this rank's returning block. Between
  // any two ranks the messages are then posted in the same order on both sides, which NCCL
  // (no tags: matched in posting order) needs; MPI and the in-process world match by tag.
  const int steps = plan.steps();
  st.ring_steps = steps;
  struct PendingSend {
    float* data = nullptr;
    size_t bytes = 0;
    int peer = 0, tag = 0;
  };
  std::vector<PendingSend> pending(lanes.size());
  for (int s = 0; s <= steps; ++s) {
    CommGroup hops(comm);
    for (Lane& lane : lanes) post_hop(comm, *engine, plan, codec, rank, s, lane, st);
    hops.end();
    if (s == 0) {
      fold(local, plan.need(rank, rank), grads.dk(own.as<float>(), n_local),
           grads.dv(own.as<float>(), n_local), 0);
    } else {
      for (size_t li = 0; li < lanes.size(); ++li) {
        Lane& lane = lanes[li];
        GradLane& g = glanes[li];
        if (s > lane.hops) continue;
        const int origin = plan.origin_at(rank, lane.dir, s);
        const int last = g.routes.last(origin);
        if (s > last) continue;  // nobody from here on needs this block
        const IndexRange acc = g.routes.acc(origin, s);
        const IndexRange prev = g.routes.acc(origin, s - 1);
        if (acc.empty()) continue;  // nothing accumulated yet, nothing to carry
        float* partial = g.partial[s & 1].as<float>();
        Clock::time_point tw = Clock::now();
        wait(g.send_req[s & 1]);  // the message sent from this buffer two steps ago
        g.send_req[s & 1].reset();
        st.comm_wait_s += seconds_since(tw);
        engine->zero(partial, grads.floats(acc.size()));
        fold(lane.held, plan.need(rank, origin), grads.dk(partial, acc.size()),
             grads.dv(partial, acc.size()), acc.lo);
        if (!prev.empty()) {
          tw = Clock::now();
          wait(g.recv_req);
          g.recv_req.reset();
          st.comm_wait_s += seconds_since(tw);
          const Clock::time_point ta = Clock::now();
          grads.add(*engine, partial, acc, g.recv_buf.as<float>(), prev);
          st.compute_s += seconds_since(ta);
        }
        const int dir_tag = lane.dir > 0 ? 0 : 1;
        pending[li] = s < last ? PendingSend{partial, grads.floats(acc.size()) * sizeof(float),
                                             lane.send_peer, kGradTag + dir_tag}
                               : PendingSend{partial, grads.floats(acc.size()) * sizeof(float),
                                             origin, kReturnTag + dir_tag};
      }
    }
    // Phase 2. The partials are complete before they are handed to the transport.
    const Clock::time_point ts = Clock::now();
    engine->sync();
    st.compute_s += seconds_since(ts);
    CommGroup phase2(comm);
    for (size_t li = 0; li < lanes.size(); ++li) {
      Lane& lane = lanes[li];
      GradLane& g = glanes[li];
      const int dir_tag = lane.dir > 0 ? 0 : 1;
      PendingSend& out = pending[li];
      if (out.data != nullptr) {
        g.send_req[s & 1] = comm.isend(out.data, out.bytes, out.peer, out.tag);
        st.bytes_sent += out.bytes;
        out = PendingSend{};
      }
      // The partial of the block held at step s+1, accumulated on hops 1..s.
      if (s + 1 >= 2 && s + 1 <= lane.hops) {
        const int origin = plan.origin_at(rank, lane.dir, s + 1);
        const IndexRange prev = g.routes.acc(origin, s);
        if (!prev.empty() && s + 1 <= g.routes.last(origin)) {
          const size_t bytes = grads.floats(prev.size()) * sizeof(float);
          g.recv_req = comm.irecv(g.recv_buf.data(), bytes, lane.recv_peer, kGradTag + dir_tag);
          st.bytes_received += bytes;
        }
      }
      // This rank's own block comes home from the rank that held it at hop `last`.
      const int last = g.routes.last(rank);
      if (last > 0 && s == last) {
        const int from = ((rank + lane.dir * last) % world + world) % world;
        g.return_req =
            comm.irecv(g.return_buf.data(), g.return_buf.size(), from, kReturnTag + dir_tag);
        st.bytes_received += g.return_buf.size();
      }
    }
    phase2.end();
    const Clock::time_point tw = Clock::now();
    for (Lane& lane : lanes) complete_hop(s, lane);
    st.comm_wait_s += seconds_since(tw);
  }

  // 4. Bring this rank's dk/dv home, sum the sinks' dk/dv and dz over all ranks, write out.
  t0 = Clock::now();
  for (GradLane& g : glanes) {
    wait(g.send_req[0]);
    wait(g.send_req[1]);
    wait(g.return_req);
  }
  st.comm_wait_s += seconds_since(t0);
  t0 = Clock::now();
  for (size_t li = 0; li < glanes.size(); ++li) {
    GradLane& g = glanes[li];
    const int last = g.routes.last(rank);
    if (last > 0) {
      grads.add(*engine, own.as<float>(), {0, n_local}, g.return_buf.as<float>(),
                g.routes.acc(rank, last));
    }
  }
  if (has_sink) engine->sink_logits_backward(*sink_logits, reduced.as<float>() + sink_floats);
  engine->sync();
  st.compute_s += seconds_since(t0);
  if (reduced_floats > 0 && reduced.size() > 0) {
    t0 = Clock::now();
    comm.allreduce(reduced.data(), reduced_floats, ReduceType::kF32, ReduceOp::kSum);
    st.broadcast_s += seconds_since(t0);
    if (world > 1) {
      st.bytes_sent += reduced_floats * sizeof(float);
      st.bytes_received += reduced_floats * sizeof(float);
    }
  }
  t0 = Clock::now();
  // The sinks are rank 0's local tokens 0..S-1 (check_sharding).
  if (rank == 0 && spec.sinks > 0) {
    grads.add(*engine, own.as<float>(), {0, n_local}, reduced.as<float>(), {0, spec.sinks});
  }
  engine->finalize_backward(dq);
  engine->store(own.as<float>(), dk);
  engine->store(own.as<float>() + grads.floats(n_local) / 2, dv);
  if (want_dsink) {
    const size_t bytes = static_cast<size_t>(shape.heads) * sizeof(float);
    if (has_sink) {
      engine->copy(dsink->data(), reduced.as<float>() + sink_floats, bytes);
    } else {
      engine->zero(dsink->data_as<float>(), static_cast<size_t>(shape.heads));
    }
  }
  engine->sync();
  st.compute_s += seconds_since(t0);
  st.total_s = seconds_since(t_start);
  return st;
}

}  // namespace ringattn
