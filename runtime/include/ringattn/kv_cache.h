#pragma once
/// The distributed KV cache for inference (SPEC section 6): prefill through the ring, then
/// exact decode with no K/V movement (tree attention).
///
/// Per rank the cache holds:
///   * the K/V of the tokens this rank owns, each with its GLOBAL position, in a ring buffer of
///     `capacity()` slots ([B, capacity, H_kv, D] for k and for v, in the cache dtype): the
///     rank's prefill shard, then the decode tokens placed on it;
///   * a replica of the S sink tokens (positions 0..S-1) on every rank, folded by exactly one
///     rank per decode call, so they count once in the merged result.
///
/// Decode inputs are REPLICATED: every rank passes the same q_new, k_new, v_new (like tree
/// attention). Each new token is stored by the rank that holds the fewest tokens (ties: lowest
/// rank); every rank knows every rank's count, so the choice needs no communication and the
/// owner simply keeps its copy. Every rank then attends the new queries over its own tokens,
/// and the partial softmax states are merged exactly by two allreduces (MAX of the running
/// maxima, then SUM of the rescaled sums and accumulators); learned sink logits are applied
/// once, after the merge.
///
/// Streaming mode (spec.window = W > 0): between calls the cache keeps the sinks and the W - 1
/// most recent tokens (every key the next query can still see; with the query's own token that
/// is its whole window); older tokens are evicted and their slots reused. A rank's tokens
/// always sit in increasing position order in its ring buffer, and the globally oldest tokens
/// are a prefix of each rank's, so eviction is a pointer move. Memory per rank is fixed at
/// construction, whatever the stream length; positions stay the original global positions.
///
/// Device (KVCacheConfig::device): on kCUDA the slots, the sink replica, the softmax state and
/// the merge buffers are device memory, the folds and the merge run on a CUDA RingEngine
/// (runtime/src/ring_engine.h) and the merge's allreduces pass device buffers; the books
/// (positions, counts, placement) stay on the host. The one-token GQA grouping (fold the G
/// query heads of a kv head as G rows) is a CPU-only optimisation.
///
/// Every call is a collective of all ranks of the communicator; bad use (decode before
/// prefill, shapes that differ from the construction, capacity exceeded) throws AgreedError
/// on every rank, never a hang.

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "kernels/cpu/attention_cpu.h"
#include "ringattn/attention.h"
#include "ringattn/memory.h"
#include "ringattn/ring.h"
#include "runtime/src/ring_engine.h"

namespace ringattn {

/// What a cache holds and how big it may get. Every rank must pass the same values.
struct KVCacheConfig {
  /// The mask (causal, window, sinks, scale) and the prefill layout. window > 0 selects
  /// streaming mode.
  AttentionSpec spec;
  int64_t batch = 1, heads = 0, kv_heads = 0, head_dim = 0;
  /// Storage and compute precision of the cache and of every tensor passed in.
  DType dtype = DType::kF32;
  /// Tokens the prefill brings (N >= P).
  int64_t prefill_len = 0;
  /// Non-streaming mode: the most tokens the sequence may reach, prefill included (0: just the
  /// prefill). Ignored in streaming mode.
  int64_t max_len = 0;
  /// The most new tokens one decode call may bring (T).
  int64_t max_step_tokens = 1;
  /// CPU kernel threads for decode (0: the kernel's default).
  int num_threads = 0;
  /// Where the tensors of prefill, load and decode live, and so the cache's storage (k/v slots,
  /// sink replica, softmax state and merge buffers): kCPU, or kCUDA (the calling thread's
  /// current device; the communicator must accept device buffers: NCCL or an in-process world
  /// of device buffers). Positions and the placement books stay on the host either way.
  Device device = Device::kCPU;
};

/// Per-rank account of one decode call.
struct DecodeStats {
  double total_s = 0.0;    ///< wall time of the call
  double compute_s = 0.0;  ///< folding this rank's tokens (kernel time)
  double merge_s = 0.0;    ///< the allreduces of the softmax state (includes waiting for peers)
  int64_t keys = 0;  ///< keys this rank attended (its live tokens, plus sinks if it folded them)
  int owner_of_first = -1;  ///< the rank that stored the call's first new token
};

class KVCache {
 public:
  /// Sizes the cache from `config` (every rank computes the same capacity) and allocates its
  /// storage; no communication. Throws Error on a bad config.
  KVCache(Communicator& comm, const KVCacheConfig& config);

  /// Token slots per rank (sinks excluded) that suffice for `config` on `world` ranks:
  ///   non-streaming: max(largest prefill shard, ceil((max_len - S) / P)) — new tokens fill the
  ///     emptiest rank first, so no rank ever exceeds the larger of its prefill shard and an
  ///     even split of the final length;
  ///   streaming: max(most of the last W - 1 prefill tokens on one rank,
  ///     ceil((W - 1 + T) / P)). Eviction only shrinks a rank and placement fills the emptiest,
  ///     so the largest rank never exceeds its size after the prefill or an even split of the
  ///     W - 1 + T tokens a decode call holds. A contiguous prefill longer than W leaves the
  ///     whole window on the last rank (the bound is then W - 1); decode re-balances it as the
  ///     old tokens are evicted. Always <= W - 1 + T: constant in the stream length.
  static int64_t capacity_for(const KVCacheConfig& config, int world);

  /// Ring forward over this rank's shard (exactly as ringattn::forward: q, o [B, N_local, H,
  /// D], k, v [B, N_local, H_kv, D], lse [B, H, N_local] f32, sink_logits [H] f32 or null) of
  /// a global sequence of config.prefill_len tokens, then keeps the shard as the cache (in
  /// streaming mode only the tokens a later query can see) and replicates the sinks on every
  /// rank. Collective; blocking. Throws AgreedError on every rank on bad input or a second
  /// prefill.
  RingStats prefill(const TensorView& q, const TensorView& k, const TensorView& v,
                    const TensorView* sink_logits, const TensorView& o, const TensorView* lse,
                    const RingOptions& options = {});

  /// Adopts this rank's K/V shard of a prefill computed elsewhere (a checkpoint, a benchmark)
  /// without running attention: k, v [B, N_local, H_kv, D] in the layout's order, as prefill
  /// takes them. Collective; the same checks as prefill.
  void load(const TensorView& k, const TensorView& v);

  /// Decodes T = q_new.size(1) new tokens at global positions length() .. length()+T-1.
  /// q_new [B, T, H, D], k_new and v_new [B, T, H_kv, D] in the cache dtype, the SAME on every
  /// rank; writes o [B, T, H, D] (any dtype) and lse [B, H, T] f32 (may be null), the same on
  /// every rank. sink_logits [H] f32 or null, as for the prefill. Appends the new K/V first
  /// (the T tokens see each other under the mask), then attends and merges. Collective;
  /// blocking.
  DecodeStats decode(const TensorView& q_new, const TensorView& k_new, const TensorView& v_new,
                     const TensorView* sink_logits, const TensorView& o, const TensorView* lse);

  /// Tokens of the sequence so far (prefill + decoded): the position of the next token.
  int64_t length() const { return length_; }
  /// Tokens this rank holds now (sinks excluded).
  int64_t local_tokens() const { return counts_[static_cast<size_t>(rank_)]; }
  /// Tokens every rank holds now (sinks excluded), indexed by rank; the same on every rank.
  const HostVector<int64_t>& rank_tokens() const { return counts_; }
  /// Global positions of this rank's tokens, oldest first.
  std::vector<int64_t> local_positions() const;
  /// Token slots per rank (sinks excluded).
  int64_t capacity() const { return capacity_; }
  bool streaming() const { return config_.spec.window > 0; }
  bool prefilled() const { return prefilled_; }
  /// Bytes per rank a cache of `config` on `world` ranks allocates (known before the first
  /// token, and before construction: the memory planner uses it). kCPU (all host memory): k
  /// and v slots, sink replicas, positions, decode scratch. kCUDA: the DEVICE bytes only: k
  /// and v slots and the sink replica, the softmax state (f32 m, l, acc) and the merge buffer
  /// for max_step_tokens queries, and the device copies of the query positions (T) and key
  /// positions (max(capacity, S)). Not counted there: the host books of a CUDA cache
  /// (positions, counts, placement: a few int64 per slot) and the CUDA kernels' per-thread
  /// tile-bounds scratch (16 bytes per 64 queries and per 64 keys of the largest fold, shared
  /// with the ring forward and grown by the constructor; see cuda::fold_scratch_bytes).
  static size_t bytes_for(const KVCacheConfig& config, int world);
  /// bytes_for(config(), world).
  size_t capacity_bytes() const;
  /// Bytes per rank the cache holds now, measured on its buffers (on the device of
  /// config().device, as bytes_for counts); equals capacity_bytes() from construction on,
  /// however many tokens pass through.
  size_t bytes() const;
  const KVCacheConfig& config() const { return config_; }

 private:
  // Row of pos_ and heads_ that describes this rank: in streaming mode every rank tracks the
  // positions of every rank's tokens (eviction must update everyone's count without talking);
  // otherwise only its own (counts alone suffice for placement).
  int64_t own_row() const { return streaming() ? rank_ : 0; }
  // Slot of the i-th oldest token of rank row `row`.
  int64_t slot(int64_t row, int64_t i) const { return (heads_[row] + i) % capacity_; }
  // Agreed checks of a prefill's (or load's) tensors and of the sizing across ranks.
  void check_prefill(const TensorView* q, const TensorView& k, const TensorView& v);
  // Keeps this rank's prefill shard (only what a later query can see) and replicates the sinks.
  void keep_shard(const TensorView& k, const TensorView& v);
  // Copies token t of k_new/v_new ([B, T, H_kv, D]) into slot s of this rank's ring buffer.
  void store_token(const TensorView& k_new, const TensorView& v_new, int64_t t, int64_t s);
  // Streaming mode: drops, on every rank's books, the tokens no query at position >= next
  // can see (positions <= next - W, sinks excluded).
  void evict_before(int64_t next);

  // Tokens [first, first + n) of a [B, N, H_kv, D] view into slots [slot, slot + n) of buf
  // ([B, cap, H_kv, D] on the cache's device).
  void put(const TensorView& src, int64_t first, int64_t n, detail::ByteBuffer& buf, int64_t cap,
           int64_t slot);
  bool on_cuda() const { return config_.device == Device::kCUDA; }
  // This rank's live slots as at most two [lo, hi) runs of its ring buffer (empty runs: lo >= hi).
  std::array<std::pair<int64_t, int64_t>, 2> live_runs() const;
  // Decode on the CUDA engine (steps 3 and 4 of decode): fold, merge, finalize.
  void attend_cuda(const TensorView& q_new, const TensorView* sink_logits, const TensorView& o,
                   const TensorView* lse, int64_t T, DecodeStats& st);

  Communicator& comm_;
  KVCacheConfig config_;
  int rank_ = 0, world_ = 1;
  Layout layout_ = Layout::kContiguous;  // the resolved prefill layout
  int64_t capacity_ = 0;
  size_t row_bytes_ = 0;                // one token of k (or v) of one batch row: H_kv * D * es
  detail::ByteBuffer k_, v_;            // [B, capacity, H_kv, D] this rank's ring buffer
  HostVector<int64_t> pos_;             // [rows, capacity] global position of every slot
  HostVector<int64_t> heads_;           // [rows] slot of each tracked rank's oldest token
  HostVector<int64_t> counts_;          // [P] tokens per rank (the same on every rank)
  detail::ByteBuffer sink_k_, sink_v_;  // [B, S, H_kv, D] replica of the sink tokens
  HostVector<int64_t> sink_pos_;        // [S] 0..S-1
  int64_t length_ = 0;
  bool prefilled_ = false;
  // Decode scratch, sized for max_step_tokens at construction so decode allocates nothing.
  cpu::SoftmaxStateCpu state_;
  cpu::SoftmaxStateCpu group_state_;  // [B, G, H_kv, D] rows: one-token GQA decode
  HostVector<float> merge_;           // [R] maxima, [R] sums, [R * D] accumulators; R = B * H * T
  HostVector<int64_t> q_pos_;         // [max(T, G)] positions of the query rows
  HostVector<int64_t> owner_;         // [T] rank that stores each new token
  HostVector<int64_t> plan_;          // [P] counts while planning a placement
  // kCUDA: the engine that folds, merges and finalizes on the device (its buffers reserved at
  // construction); kCPU: null (the state and merge buffers above do it on the host).
  std::unique_ptr<detail::RingEngine> engine_;
};

}  // namespace ringattn
