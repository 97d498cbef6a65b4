// The ring backward (SPEC section 5): agree, broadcast the sinks, then the same double-buffered
// K/V ring as the forward, with each block's dk/dv accumulators travelling behind it.
//
// For origin o in direction d, the receivers are the ranks o + d*h at hops h = 1..last(o, d)
// (last: the farthest hop whose receiver needs anything of o). acc(o, d, h) is the hull of the
// needs of hops 1..h: the key range whose dk/dv the block has accumulated after hop h. Step s
// of the loop (s = 0 is the local step) does, per lane:
//   post:    hop s+1 of K/V exactly as the forward; and the receive of the dk/dv of the block
//            held now, accumulated by hops 1..s-1 (range acc(o, d, s-1)), from the previous rank;
//   compute: the held block's need into a fresh f32 partial of range acc(o, d, s) (dq into the
//            local state);
//   add:     wait for that dk/dv and add it into the partial; send the partial on to the next
//            rank, or at s = last(o, d) straight back to the owner o (a direct message over the
//            distance: no lap to bring it home, so with a window the bytes stay O(W + S));
//   wait:    K/V hop s+1.
// The dk/dv message of hop s is sent right after the compute of step s and overlaps the compute
// of step s+1 on the next rank, which only adds it in after its own compute.
// Owners add the returned accumulators into their own (local step) dk/dv; the sink block's
// dk/dv and the learned-sink dz are summed over all ranks in one allreduce.

#include <algorithm>
#include <vector>

#include "kernels/cpu/attention_cpu_bwd.h"
#include "ringattn/memory.h"
#include "ringattn/ring.h"
#include "runtime/src/ring_buffers.h"
#include "runtime/src/ring_common.h"
#include "runtime/src/ring_plan.h"

namespace ringattn {
namespace {

using detail::agree_configuration;
using detail::Block;
using detail::BlockCodec;
using detail::broadcast_sinks;
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

// f32 dk then dv of `tokens` keys, [B, tokens, H_kv, D] each, in one contiguous buffer.
struct GradCodec {
  int64_t batch, kv_heads, head_dim;
  size_t floats(int64_t tokens) const {
    return 2 * static_cast<size_t>(batch * tokens * kv_heads * head_dim);
  }
  TensorView dk(float* buf, int64_t tokens) const {
    return TensorView(buf, DType::kF32, {batch, tokens, kv_heads, head_dim});
  }
  TensorView dv(float* buf, int64_t tokens) const {
    return TensorView(buf + floats(tokens) / 2, DType::kF32, {batch, tokens, kv_heads, head_dim});
  }
  // dst (range dst_range, a buffer of this layout) += src (range src_range inside dst_range).
  void add(float* dst, IndexRange dst_range, const float* src, IndexRange src_range) const {
    const int64_t row = kv_heads * head_dim;
    for (int part = 0; part < 2; ++part) {
      float* d = dst + part * floats(dst_range.size()) / 2;
      const float* s = src + part * floats(src_range.size()) / 2;
      for (int64_t b = 0; b < batch; ++b) {
        float* drow = d + (b * dst_range.size() + src_range.lo - dst_range.lo) * row;
        const float* srow = s + b * src_range.size() * row;
        const int64_t n = src_range.size() * row;
        for (int64_t i = 0; i < n; ++i) drow[i] += srow[i];
      }
    }
  }
};

// The dk/dv side of one K/V lane.
struct GradLane {
  GradRoutes routes;
  HostVector<float> partial[2];  // by step parity: one may still be sending while we fill the other
  RequestPtr send_req[2];
  HostVector<float> recv_buf;
  RequestPtr recv_req;
  HostVector<float> return_buf;  // this rank's own block coming home
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

// out (any dtype, strided) = acc ([B, N, H, D] f32, contiguous).
void store(const float* acc, const TensorView& out) {
  const int64_t bsz = out.size(0), n = out.size(1), heads = out.size(2), d = out.size(3);
  for (int64_t b = 0; b < bsz; ++b) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* a = acc + ((b * n + i) * heads + h) * d;
        const int64_t off = b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
        for (int64_t c = 0; c < d; ++c) store_from_float(out.data(), out.dtype(), off + c, a[c]);
      }
    }
  }
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
                         dsink->dtype() == DType::kF32 && dsink->stride(0) == 1,
                     "dsink must be [H] f32 contiguous with H=", shape.heads, ", got ",
                     dsink->describe());
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
  cpu::BackwardStateCpu state;
  state.begin(o, dout, lse);
  const BlockCodec codec(shape.batch, shape.kv_heads, shape.head_dim, q.dtype());
  const GradCodec grads{shape.batch, shape.kv_heads, shape.head_dim};
  // This rank's own dk/dv (f32, [dk; dv] of its whole shard): the local step, the returns and,
  // on rank 0, the sinks' sum are added here.
  HostVector<float> own(grads.floats(n_local), 0.0f);
  st.compute_s += seconds_since(t0);

  // Folds the part `need` of a held block into dq and into the f32 accumulators dk_acc, dv_acc
  // whose key 0 is local index acc_lo of the block's origin.
  auto fold = [&](const Block& blk, IndexRange need, const TensorView& dk_acc,
                  const TensorView& dv_acc, int64_t acc_lo) {
    if (!blk.valid() || need.empty()) {
      ++st.blocks_skipped;
      return;
    }
    const int64_t off = need.lo - blk.range.lo;
    const TensorView kb = blk.k.slice(1, off, off + need.size());
    const TensorView vb = blk.v.slice(1, off, off + need.size());
    k_pos.resize(static_cast<size_t>(need.size()));
    plan.shard(blk.origin).positions(need.lo, need.hi, k_pos.data());
    const int64_t a0 = need.lo - acc_lo;
    const Clock::time_point t1 = Clock::now();
    const cpu::FoldStats fs =
        cpu::fold_block_backward(spec, q, q_pos.data(), kb, vb, k_pos.data(), dout, state,
                                 dk_acc.slice(1, a0, a0 + need.size()),
                                 dv_acc.slice(1, a0, a0 + need.size()), options.num_threads);
    st.compute_s += seconds_since(t1);
    st.tiles_computed += fs.tiles_computed;
    st.tiles_skipped += fs.tiles_skipped;
    st.flops += fs.flops;
    ++st.blocks_computed;
  };

  // 2. The sinks: every rank folds the broadcast block into its own f32 sink dk/dv; these and
  // the local dz are summed over all ranks below.
  HostVector<float> reduced;  // [sink dk; sink dv] then dz [H]
  const size_t sink_floats = grads.floats(spec.sinks);
  if (spec.sinks > 0 || has_sink) reduced.assign(sink_floats + (has_sink ? shape.heads : 0), 0.0f);
  if (spec.sinks > 0) {
    t0 = Clock::now();
    HostVector<char> sink_buf;
    const Block sinks = broadcast_sinks(comm, codec, k, v, spec.sinks, sink_buf, st);
    st.broadcast_s = seconds_since(t0);
    HostVector<int64_t> sink_pos(static_cast<size_t>(spec.sinks));
    for (int64_t j = 0; j < spec.sinks; ++j) sink_pos[j] = j;
    const Clock::time_point t1 = Clock::now();
    const cpu::FoldStats fs =
        cpu::fold_block_backward(spec, q, q_pos.data(), sinks.k, sinks.v, sink_pos.data(), dout,
                                 state, grads.dk(reduced.data(), spec.sinks),
                                 grads.dv(reduced.data(), spec.sinks), options.num_threads);
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
  std::vector<Lane> lanes = make_lanes(plan, codec, rank, local, kKvTag);
  std::vector<GradLane> glanes;
  for (const Lane& lane : lanes) {
    GradLane g{GradRoutes(plan, lane.dir, lane.hops), {}, {}, {}, {}, {}, {}};
    // The travelling buffers hold the largest acc of any origin; the memory planner counts
    // exactly these (GradRoutes::max_tokens, home_tokens).
    const size_t max_floats = grads.floats(g.routes.max_tokens());
    g.partial[0].resize(max_floats);
    g.partial[1].resize(max_floats);
    g.recv_buf.resize(max_floats);
    // Post the return of this rank's own block now: it comes from the rank at distance last.
    const int last = g.routes.last(rank);
    if (last > 0) {
      g.return_buf.resize(grads.floats(g.routes.home_tokens(rank)));
      const int from = ((rank + lane.dir * last) % world + world) % world;
      g.return_req = comm.irecv(g.return_buf.data(), g.return_buf.size() * sizeof(float), from,
                                kReturnTag + (lane.dir > 0 ? 0 : 1));
      st.bytes_received += g.return_buf.size() * sizeof(float);
    }
    glanes.push_back(std::move(g));
  }

  const int steps = plan.steps();
  st.ring_steps = steps;
  for (int s = 0; s <= steps; ++s) {
    for (size_t li = 0; li < lanes.size(); ++li) {
      Lane& lane = lanes[li];
      post_hop(comm, plan, codec, rank, s, lane, st);
      // The dk/dv of the block held at this step, accumulated on hops 1..s-1.
      GradLane& g = glanes[li];
      if (s >= 2 && s <= lane.hops) {
        const int origin = plan.origin_at(rank, lane.dir, s);
        const IndexRange prev = g.routes.acc(origin, s - 1);
        if (!prev.empty() && s <= g.routes.last(origin)) {
          const size_t bytes = grads.floats(prev.size()) * sizeof(float);
          g.recv_req = comm.irecv(g.recv_buf.data(), bytes, lane.recv_peer,
                                  kGradTag + (lane.dir > 0 ? 0 : 1));
          st.bytes_received += bytes;
        }
      }
    }
    if (s == 0) {
      fold(local, plan.need(rank, rank), grads.dk(own.data(), n_local),
           grads.dv(own.data(), n_local), 0);
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
        HostVector<float>& partial = g.partial[s & 1];
        Clock::time_point tw = Clock::now();
        wait(g.send_req[s & 1]);  // the message sent from this buffer two steps ago
        g.send_req[s & 1].reset();
        st.comm_wait_s += seconds_since(tw);
        std::fill(partial.begin(), partial.begin() + grads.floats(acc.size()), 0.0f);
        fold(lane.held, plan.need(rank, origin), grads.dk(partial.data(), acc.size()),
             grads.dv(partial.data(), acc.size()), acc.lo);
        if (!prev.empty()) {
          tw = Clock::now();
          wait(g.recv_req);
          g.recv_req.reset();
          st.comm_wait_s += seconds_since(tw);
          const Clock::time_point ta = Clock::now();
          grads.add(partial.data(), acc, g.recv_buf.data(), prev);
          st.compute_s += seconds_since(ta);
        }
        const size_t bytes = grads.floats(acc.size()) * sizeof(float);
        if (s < last) {
          g.send_req[s & 1] =
              comm.isend(partial.data(), bytes, lane.send_peer, kGradTag + (lane.dir > 0 ? 0 : 1));
        } else {
          g.send_req[s & 1] =
              comm.isend(partial.data(), bytes, origin, kReturnTag + (lane.dir > 0 ? 0 : 1));
        }
        st.bytes_sent += bytes;
      }
    }
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
    if (last > 0)
      grads.add(own.data(), {0, n_local}, g.return_buf.data(), g.routes.acc(rank, last));
  }
  if (has_sink) cpu::sink_logits_backward(state, *sink_logits, reduced.data() + sink_floats);
  st.compute_s += seconds_since(t0);
  if (!reduced.empty()) {
    t0 = Clock::now();
    comm.allreduce(reduced.data(), reduced.size(), ReduceType::kF32, ReduceOp::kSum);
    st.broadcast_s += seconds_since(t0);
    if (world > 1) {
      st.bytes_sent += reduced.size() * sizeof(float);
      st.bytes_received += reduced.size() * sizeof(float);
    }
  }
  t0 = Clock::now();
  // The sinks are rank 0's local tokens 0..S-1 (check_sharding).
  if (rank == 0 && spec.sinks > 0) {
    grads.add(own.data(), {0, n_local}, reduced.data(), {0, spec.sinks});
  }
  cpu::finalize_backward(state, dq);
  store(own.data(), dk);
  store(own.data() + grads.floats(n_local) / 2, dv);
  if (want_dsink) {
    float* out = dsink->data_as<float>();
    for (int64_t h = 0; h < shape.heads; ++h) out[h] = has_sink ? reduced[sink_floats + h] : 0.0f;
  }
  st.compute_s += seconds_since(t0);
  st.total_s = seconds_since(t_start);
  return st;
}

}  // namespace ringattn
