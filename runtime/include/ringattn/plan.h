#pragma once
/// The memory planner: the bytes each rank needs for one attention call, computed before
/// anything is allocated. A pure function (no MPI, no allocation of the planned buffers): it
/// evaluates the same ring plan the runtime runs (runtime/src/ring_plan.h) and the same buffer
/// sizes, so for the forward and the backward the plan equals what the accounting allocator
/// (memory.h) measures (with one kernel thread; with several, every thread that may run a
/// kernel work item is counted).
///
/// Modes: forward (q, k, v, o, lse and the ring), train (forward then backward: dq, dk, dv, do
/// and the travelling dk/dv accumulators, SPEC section 5), infer (a KV cache allocated before
/// the forward prefill, then decode: SPEC section 6; the cache is sized by
/// KVCache::bytes_for, the same function the cache uses).

#include <cstdint>
#include <string>
#include <vector>

#include "ringattn/attention.h"
#include "ringattn/tensor.h"

namespace ringattn {

/// What the planned run does.
enum class PlanMode : uint8_t { kForward = 0, kTrain = 1, kInfer = 2 };
const char* plan_mode_name(PlanMode mode);
/// Parses "forward" | "train" | "infer"; throws Error otherwise.
PlanMode parse_plan_mode(const std::string& name);

/// The problem and the machine shape. spec.layout may be kAuto (resolved like the runtime).
struct PlanInput {
  int64_t seq_len = 0;  ///< global N
  int ranks = 1;        ///< P
  int64_t batch = 1, heads = 1, kv_heads = 1, head_dim = 64;
  DType dtype = DType::kF32;
  AttentionSpec spec;
  PlanMode mode = PlanMode::kForward;
  /// Infer only: tokens decoded after the prefill of seq_len tokens (non-streaming mode: the
  /// cache holds seq_len + decode_tokens tokens; with a window its size does not depend on it).
  int64_t decode_tokens = 0;
  /// CPU kernel threads per rank (each holds its own kernel workspace); >= 1.
  int threads = 1;
  /// Learned per-head sink logits are given (train: the backward reduces their gradient dz [H]
  /// together with the sinks' dk/dv).
  bool sink_logits = false;
  /// Where the runtime's buffers live: kCPU (the CPU kernels; host memory) or kCUDA (the CUDA
  /// kernels; device memory, which is what --gpu-mem budgets).
  Device device = Device::kCPU;
};

/// Bytes one rank needs, by component. Every field is bytes. `peak` is the high-water mark of
/// a call that follows another of the same problem (the kernels' per-thread workspaces are kept
/// between calls, as in a training loop; the first call needs at most this); it is at most the
/// sum of the components (the sink copy is freed before the ring buffers are allocated, and the
/// forward's and backward's runtime buffers never coexist).
/// Train: the caller's gradient tensors dout, dq, dk, dv are allocated after the forward (as
/// autograd does) and the kernel workspaces of both passes are kept.
struct RankMemory {
  int rank = 0;
  int64_t tokens = 0;  ///< N_local
  // The caller's tensors (allocated by the caller, e.g. ringattn scale-test).
  int64_t q = 0, k = 0, v = 0, o = 0, lse = 0;
  int64_t dout = 0, dq = 0, dk = 0, dv = 0;  ///< train only
  // The forward's runtime buffers.
  int64_t positions = 0;         ///< global positions of the local queries and of a key block
  int64_t ring_buffers = 0;      ///< per ring direction: two receive buffers and a send buffer
  int64_t sink_copy = 0;         ///< the broadcast [k; v] of the S sinks (and their positions)
  int64_t softmax_state = 0;     ///< m, l [B, H, N_local] and acc [B, N_local, H, D], f32
  int64_t kernel_workspace = 0;  ///< per kernel thread: score tile, f32 copies of q/k/v tiles
  // The backward's runtime buffers (train only; its sink phase holds sink_copy again).
  int64_t backward_positions = 0;  ///< as positions
  int64_t backward_state = 0;      ///< lse, Delta [B, H, N_local] and dq [B, N_local, H, D], f32
  int64_t grad_accumulators = 0;   ///< f32 dk, dv of the own block; the sinks' dk/dv and dz
  /// per ring direction: the k/v lane as the forward's; f32 dk/dv: two travelling partials and
  /// a receive buffer of the route's largest accumulated range, and the own block's return
  int64_t backward_ring_buffers = 0;
  int64_t backward_workspace = 0;  ///< per kernel thread: P, dP and dq tiles, f32 row copies
  // The KV cache (infer only): KVCache::bytes_for, the bytes the cache allocates.
  int64_t cache = 0;
  int64_t peak = 0;  ///< high-water mark of the run on this rank
};

/// The plan of every rank.
struct MemoryPlan {
  PlanInput input;
  Layout layout = Layout::kContiguous;  ///< resolved
  int forward_hops = 0, backward_hops = 0;
  std::vector<RankMemory> ranks;
  int max_rank = 0;  ///< the rank with the largest peak (the lowest such rank)
  int64_t max_peak() const { return ranks.empty() ? 0 : ranks[max_rank].peak; }
};

/// Plans every rank. Throws Error (invalid argument) on a problem the runtime would reject
/// (N < P, H % H_kv != 0, sinks outside rank 0's first chunk, ...). Cost O(P^2).
MemoryPlan plan_memory(const PlanInput& input);

/// The largest N such that plan_memory (with seq_len = N) has max_peak() <= budget_bytes, found
/// by bisection on plan_memory itself: plan(N) fits and plan(N + 1) does not (0 if no valid N
/// fits; at most 2^40). input.seq_len is ignored.
int64_t max_seq_len(const PlanInput& input, int64_t budget_bytes);

/// The smallest P such that plan_memory (with ranks = P) fits in budget_bytes per rank, found by
/// bisection: plan(P) fits and plan(P - 1) does not (P = 1 counts as the lower end). 0 if not
/// even P = min(N, max_ranks) fits. input.ranks is ignored.
int min_ranks(const PlanInput& input, int64_t budget_bytes, int max_ranks = 1 << 16);

}  // namespace ringattn
