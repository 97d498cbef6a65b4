// The memory planner. The forward and the backward mirror runtime/src/ring_attention.cc and
// runtime/src/ring_backward.cc buffer by buffer, evaluated on the same RingPlan with the sizing
// functions the runtime itself uses (ring_buffers.h) and the kernels' workspace functions, so
// the planned peak is what the accounting allocator measures. The KV cache (infer) is sized by
// KVCache::bytes_for, the function the cache itself allocates by.

#include "ringattn/plan.h"

#include <algorithm>

#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/attention_cpu_bwd.h"
#include "kernels/cuda/attention_cuda.h"
#include "ringattn/error.h"
#include "ringattn/kv_cache.h"
#include "runtime/src/ring_buffers.h"
#include "runtime/src/ring_plan.h"
#include "runtime/src/sharding.h"

namespace ringattn {
namespace {

using detail::GradRoutes;
using detail::lane_tokens;
using detail::max_need;

constexpr int64_t kF32 = 4, kI64 = 8;

// Sizes of one problem in elements, shared by every component below.
struct Dims {
  int64_t b, h, hkv, d, es;
  int64_t q_like(int64_t tokens) const { return b * tokens * h * d * es; }     // q, o, do, dq
  int64_t kv_like(int64_t tokens) const { return b * tokens * hkv * d * es; }  // k, v, dk, dv
  int64_t kv_f32(int64_t tokens) const { return b * tokens * hkv * d * kF32; }
};

// Everything the forward of one rank allocates besides the caller's tensors.
struct ForwardRuntime {
  int64_t positions = 0, ring_buffers = 0, sink_copy = 0, softmax_state = 0;
  int64_t kernel_workspace = 0;
  int64_t peak = 0;  // high-water mark of the above without the kernel workspace
};

// The forward's ring buffers: per direction that has hops, recv_buf[2] + send_buf, each
// holding [k; v] of the lane's largest carried range.
int64_t forward_ring_bytes(const RingPlan& plan, const Dims& dm) {
  int64_t total = 0;
  for (int dir : {+1, -1}) {
    const int hops = dir > 0 ? plan.forward_hops() : plan.backward_hops();
    if (hops > 0) total += 3 * 2 * dm.kv_like(lane_tokens(plan, dir));
  }
  return total;
}

ForwardRuntime plan_forward_runtime(const PlanInput& in, const RingPlan& plan, int rank,
                                    const Dims& dm) {
  ForwardRuntime f;
  const int64_t n = plan.shard(rank).size();
  const int64_t sinks = in.spec.sinks;
  const int64_t need = max_need(plan, rank);
  // q_pos [n] for the whole call; k_pos reserved once for the largest need.
  f.positions = n * kI64 + need * kI64;
  f.softmax_state = 2 * dm.b * dm.h * n * kF32 + dm.b * n * dm.h * dm.d * kF32;
  f.ring_buffers = forward_ring_bytes(plan, dm);
  // The sink block [k; v] and its positions live only while the sinks are folded.
  f.sink_copy = sinks > 0 ? 2 * dm.kv_like(sinks) + sinks * kI64 : 0;
  if (in.device == Device::kCUDA) {
    // On the GPU (ring_engine.cc, CudaEngine): q_pos and a key-position buffer that grows to
    // the largest fold (the sinks' first) are device copies; the sink positions live in the
    // latter; the kernels' workspace is the per-thread tile-bounds scratch.
    const int64_t kpos = std::max(need, sinks) * kI64;
    f.positions = n * kI64 + kpos;
    f.sink_copy = sinks > 0 ? 2 * dm.kv_like(sinks) : 0;
    f.kernel_workspace =
        cuda::fold_scratch_bytes(false, in.dtype, in.head_dim, n, std::max(need, sinks));
    f.peak = n * kI64 + f.softmax_state +
             std::max(sinks > 0 ? f.sink_copy + sinks * kI64 : 0, f.ring_buffers + kpos);
    return f;
  }
  // The kernel's per-thread workspace grows to the largest fold (every component of it grows
  // with the keys of the fold) and is kept: see plan_memory.
  f.kernel_workspace = cpu::fold_workspace_bytes(in.spec, in.batch, in.heads, in.head_dim, n,
                                                 std::max(need, sinks), in.dtype, in.threads);
  f.peak = f.positions + f.softmax_state + std::max(f.sink_copy, f.ring_buffers);
  return f;
}

// ---- train: the backward (ring_backward.cc) ----------------------------------------------
// In allocation order: q_pos and k_pos (reserved once for the largest need); the backward state
// (lse and Delta [B, H, n], dq [B, n, H, D], f32); the rank's own dk/dv [B, n, H_kv, D] f32;
// the sinks' dk/dv and the learned-sink dz (summed over ranks in one allreduce); then the sink
// phase (the broadcast sink block and its positions, freed before the ring) and the ring phase
// (per direction with hops: the K/V lane as in the forward, and for dk/dv two travelling
// partials and a receive buffer of the route's largest accumulated range, plus the return
// buffer of the rank's own block). The kernel's per-thread workspace is its own (not the
// forward's), grows to the largest fold and is kept.
struct BackwardRuntime {
  int64_t positions = 0, state = 0, grad_accumulators = 0, ring_buffers = 0, sink_copy = 0;
  int64_t workspace = 0;
  int64_t peak = 0;  // high-water mark of the above without the kernel workspace
};

BackwardRuntime plan_backward_runtime(const PlanInput& in, const RingPlan& plan, int rank,
                                      const Dims& dm) {
  BackwardRuntime bw;
  const int64_t n = plan.shard(rank).size();
  const int64_t sinks = in.spec.sinks;
  const int64_t need = max_need(plan, rank);
  bw.positions = n * kI64 + need * kI64;
  bw.state = 2 * dm.b * dm.h * n * kF32 + dm.b * n * dm.h * dm.d * kF32;
  bw.grad_accumulators = 2 * dm.kv_f32(n);
  if (sinks > 0 || in.sink_logits) {
    bw.grad_accumulators += 2 * dm.kv_f32(sinks) + (in.sink_logits ? dm.h * kF32 : 0);
  }
  bw.ring_buffers = forward_ring_bytes(plan, dm);
  for (int dir : {+1, -1}) {
    const int hops = dir > 0 ? plan.forward_hops() : plan.backward_hops();
    if (hops == 0) continue;
    const GradRoutes routes(plan, dir, hops);
    bw.ring_buffers +=
        3 * 2 * dm.kv_f32(routes.max_tokens()) + 2 * dm.kv_f32(routes.home_tokens(rank));
  }
  bw.sink_copy = sinks > 0 ? 2 * dm.kv_like(sinks) + sinks * kI64 : 0;
  if (in.device == Device::kCUDA) {
    // As the forward on the GPU; the backward state holds Delta and dq (lse is read in place).
    const int64_t kpos = std::max(need, sinks) * kI64;
    bw.positions = n * kI64 + kpos;
    bw.state = dm.b * dm.h * n * kF32 + dm.b * n * dm.h * dm.d * kF32;
    bw.sink_copy = sinks > 0 ? 2 * dm.kv_like(sinks) : 0;
    bw.workspace = cuda::fold_scratch_bytes(true, in.dtype, in.head_dim, n, std::max(need, sinks));
    bw.peak = n * kI64 + bw.state + bw.grad_accumulators +
              std::max(sinks > 0 ? bw.sink_copy + sinks * kI64 : 0, bw.ring_buffers + kpos);
    return bw;
  }
  bw.workspace = cpu::backward_workspace_bytes(in.spec, in.batch, in.kv_heads, in.head_dim, n,
                                               std::max(need, sinks), in.dtype, in.threads);
  bw.peak =
      bw.positions + bw.state + bw.grad_accumulators + std::max(bw.sink_copy, bw.ring_buffers);
  return bw;
}

// ---- infer: the KV cache ------------------------------------------------------------------
// The cache allocates everything in its constructor, before the prefill, and sizes it with
// KVCache::bytes_for: the plan asks the same function (one token per decode step, as
// `ringattn infer` and `attend --decode-from` decode).
KVCacheConfig cache_config(const PlanInput& in) {
  KVCacheConfig c;
  c.spec = in.spec;
  c.batch = in.batch;
  c.heads = in.heads;
  c.kv_heads = in.kv_heads;
  c.head_dim = in.head_dim;
  c.dtype = in.dtype;
  c.prefill_len = in.seq_len;
  c.max_len = in.seq_len + in.decode_tokens;
  c.max_step_tokens = 1;
  c.num_threads = in.threads;
  c.device = in.device;
  return c;
}

int64_t plan_cache(const PlanInput& in) {
  return static_cast<int64_t>(KVCache::bytes_for(cache_config(in), in.ranks));
}

// On the GPU the cache's constructor grows the per-thread tile-bounds scratch (shared with the
// prefill's folds) for its decode folds: one query over up to max(capacity, S) keys.
int64_t cache_fold_scratch(const PlanInput& in) {
  const KVCacheConfig c = cache_config(in);
  const int64_t keys = std::max(KVCache::capacity_for(c, in.ranks), c.spec.sinks);
  return cuda::fold_scratch_bytes(false, in.dtype, in.head_dim, c.max_step_tokens, keys);
}

// A configuration the runtime would reject (e.g. too many ranks for the sinks) does not fit.
bool fits(const PlanInput& in, int64_t budget) {
  try {
    return plan_memory(in).max_peak() <= budget;
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kInvalidArgument) throw;
    return false;
  }
}

// Smallest N the runtime accepts for P ranks: N >= P and the S sinks inside rank 0's first run
// (ceil(N / P) >= S contiguous, ceil(N / 2P) >= S zigzag).
int64_t smallest_seq_len(const PlanInput& in, Layout layout) {
  const int64_t p = in.ranks, chunks = layout == Layout::kZigzag ? 2 * p : p;
  const int64_t s = in.spec.sinks;
  return std::max<int64_t>(p, s > 0 ? (s - 1) * chunks + 1 : 1);
}

}  // namespace

const char* plan_mode_name(PlanMode mode) {
  switch (mode) {
    case PlanMode::kForward:
      return "forward";
    case PlanMode::kTrain:
      return "train";
    case PlanMode::kInfer:
      return "infer";
  }
  return "?";
}

PlanMode parse_plan_mode(const std::string& name) {
  if (name == "forward") return PlanMode::kForward;
  if (name == "train") return PlanMode::kTrain;
  if (name == "infer") return PlanMode::kInfer;
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "mode must be forward, train or infer, got '", name,
                 "'");
}

MemoryPlan plan_memory(const PlanInput& in) {
  RINGATTN_CHECK(in.batch > 0 && in.heads > 0 && in.kv_heads > 0 && in.head_dim > 0,
                 "batch, heads, kv_heads and head_dim must be > 0, got B=", in.batch,
                 " H=", in.heads, " H_kv=", in.kv_heads, " D=", in.head_dim);
  RINGATTN_CHECK(in.heads % in.kv_heads == 0,
                 "heads must be a multiple of kv_heads (H % H_kv == 0), got H=", in.heads,
                 " H_kv=", in.kv_heads);
  RINGATTN_CHECK(in.ranks >= 1, "ranks must be >= 1, got ", in.ranks);
  RINGATTN_CHECK(in.threads >= 1, "threads must be >= 1, got ", in.threads);
  RINGATTN_CHECK(in.decode_tokens >= 0, "decode_tokens must be >= 0, got ", in.decode_tokens);
  validate_spec(in.spec);
  MemoryPlan mp;
  mp.input = in;
  mp.layout = resolve_layout(in.spec.layout, in.spec.causal, in.spec.window);
  const RingPlan plan(
      RingGeometry{in.seq_len, in.ranks, mp.layout, in.spec.causal, in.spec.window, in.spec.sinks});
  mp.forward_hops = plan.forward_hops();
  mp.backward_hops = plan.backward_hops();
  const Dims dm{in.batch, in.heads, in.kv_heads, in.head_dim,
                static_cast<int64_t>(dtype_size(in.dtype))};

  mp.ranks.resize(static_cast<size_t>(in.ranks));
  for (int r = 0; r < in.ranks; ++r) {
    RankMemory& m = mp.ranks[static_cast<size_t>(r)];
    const int64_t n = plan.shard(r).size();
    m.rank = r;
    m.tokens = n;
    m.q = m.o = dm.q_like(n);
    m.k = m.v = dm.kv_like(n);
    m.lse = dm.b * dm.h * n * kF32;
    const ForwardRuntime f = plan_forward_runtime(in, plan, r, dm);
    m.positions = f.positions;
    m.ring_buffers = f.ring_buffers;
    m.sink_copy = f.sink_copy;
    m.softmax_state = f.softmax_state;
    m.kernel_workspace = f.kernel_workspace;
    if (in.mode == PlanMode::kInfer) {
      m.cache = plan_cache(in);
      if (in.device == Device::kCUDA) {
        m.kernel_workspace = std::max(m.kernel_workspace, cache_fold_scratch(in));
      }
    }
    // The kernels' per-thread workspaces are kept between calls, so from the second call on
    // they are already at their largest when the sinks are folded (and the forward's is there
    // in the backward, the backward's in the next forward): the plan is that steady state, which
    // the first call never exceeds.
    const int64_t tensors = m.q + m.k + m.v + m.o + m.lse;
    m.peak = tensors + m.cache + m.kernel_workspace + f.peak;
    if (in.mode == PlanMode::kTrain) {
      m.dout = m.dq = dm.q_like(n);
      m.dk = m.dv = dm.kv_like(n);
      const BackwardRuntime bw = plan_backward_runtime(in, plan, r, dm);
      m.backward_positions = bw.positions;
      m.backward_state = bw.state;
      m.grad_accumulators = bw.grad_accumulators;
      m.backward_ring_buffers = bw.ring_buffers;
      m.backward_workspace = bw.workspace;
      // The gradient tensors exist from the backward on; the forward's buffers are released
      // before the backward's are allocated.
      const int64_t grads = m.dout + m.dq + m.dk + m.dv;
      // On the GPU both passes share one per-thread scratch, which grows to the larger.
      const int64_t workspaces = in.device == Device::kCUDA
                                     ? std::max(f.kernel_workspace, bw.workspace)
                                     : f.kernel_workspace + bw.workspace;
      m.peak = tensors + workspaces + std::max(f.peak, grads + bw.peak);
    }
    if (m.peak > mp.ranks[static_cast<size_t>(mp.max_rank)].peak) mp.max_rank = r;
  }
  return mp;
}

int64_t max_seq_len(const PlanInput& input, int64_t budget_bytes) {
  PlanInput in = input;
  const Layout layout = resolve_layout(in.spec.layout, in.spec.causal, in.spec.window);
  constexpr int64_t kMaxSeqLen = int64_t{1} << 40;
  auto fits_at = [&](int64_t n) {
    in.seq_len = n;
    return fits(in, budget_bytes);
  };
  int64_t lo = smallest_seq_len(input, layout);
  if (!fits_at(lo)) return 0;
  // Grow until it does not fit: lo fits, hi does not.
  int64_t hi = lo;
  while (true) {
    if (hi >= kMaxSeqLen) return kMaxSeqLen;
    hi = std::min(kMaxSeqLen, hi * 2);
    if (!fits_at(hi)) break;
    lo = hi;
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (fits_at(mid) ? lo : hi) = mid;
  }
  return lo;
}

int min_ranks(const PlanInput& input, int64_t budget_bytes, int max_ranks) {
  PlanInput in = input;
  const int64_t cap = std::min<int64_t>(max_ranks, input.seq_len);
  RINGATTN_CHECK(cap >= 1, "seq_len and max_ranks must be >= 1, got N=", input.seq_len,
                 " max_ranks=", max_ranks);
  auto fits_at = [&](int64_t p) {
    in.ranks = static_cast<int>(p);
    return fits(in, budget_bytes);
  };
  if (fits_at(1)) return 1;
  // lo does not fit, hi does.
  int64_t lo = 1, hi = 1;
  while (true) {
    if (hi >= cap) return 0;
    hi = std::min(cap, hi * 2);
    if (fits_at(hi)) break;
    lo = hi;
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (fits_at(mid) ? hi : lo) = mid;
  }
  return static_cast<int>(hi);
}

}  // namespace ringattn
