#pragma once
/// The CPU attention kernel: blockwise, CBLAS block products, fused online softmax, threads
/// over (batch, head, query tile). The ring calls fold_block once per K/V block it receives.
///
/// Shapes: q [B, Nq, H, D]; k, v [B, Nk, H_kv, D] (f32, bf16 or f16; innermost dim
/// contiguous, other strides free, so a slice of a larger buffer is a valid block);
/// q_pos [Nq], k_pos [Nk] the GLOBAL positions of the tokens (masks use only these).

#include <cstdint>
#include <vector>

#include "ringattn/attention.h"
#include "ringattn/memory.h"

namespace ringattn::cpu {

/// f32 online-softmax state of a block of queries: m, l as [B, H, Nq], acc as [B, Nq, H, D].
/// See kernels/softmax_state.h for the meaning of each field.
class SoftmaxStateCpu {
 public:
  SoftmaxStateCpu() = default;
  SoftmaxStateCpu(int64_t batch, int64_t q_len, int64_t heads, int64_t head_dim) {
    reset(batch, q_len, heads, head_dim);
  }
  /// Sizes the state and empties it (m = -inf, l = 0, acc = 0).
  void reset(int64_t batch, int64_t q_len, int64_t heads, int64_t head_dim);

  int64_t batch() const { return batch_; }
  int64_t q_len() const { return q_len_; }
  int64_t heads() const { return heads_; }
  int64_t head_dim() const { return head_dim_; }
  float* m() { return m_.data(); }
  float* l() { return l_.data(); }
  float* acc() { return acc_.data(); }
  const float* m() const { return m_.data(); }
  const float* l() const { return l_.data(); }
  const float* acc() const { return acc_.data(); }
  /// Bytes held (for the memory accounting).
  size_t nbytes() const { return (m_.size() + l_.size() + acc_.size()) * sizeof(float); }

 private:
  int64_t batch_ = 0, q_len_ = 0, heads_ = 0, head_dim_ = 0;
  HostVector<float> m_, l_, acc_;
};

/// How much of a fold was computed (tiles are query tile x key tile pairs).
struct FoldStats {
  int64_t tiles_computed = 0;
  int64_t tiles_skipped = 0;  ///< fully masked by positions: never computed
  double flops = 0.0;         ///< 4 * rows * keys * D over computed tiles
};

/// Number of threads the CPU kernel uses when given 0: $RINGATTN_NUM_THREADS if set, else the
/// hardware concurrency.
int default_num_threads();

/// Folds one K/V block into `state` (which must be sized for q). Blocking; threads over
/// (batch, head, query tile); num_threads 0 = default_num_threads(). Throws Error on bad
/// shapes. Folding the blocks of a key set in any order gives the same result to f32
/// rounding.
FoldStats fold_block(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                     const TensorView& k, const TensorView& v, const int64_t* k_pos,
                     SoftmaxStateCpu& state, int num_threads = 0);

/// Bytes of kernel workspace (accounted, per thread, kept between calls) that fold_block holds
/// after folding kv_len keys into q_len queries of this shape and dtype (q and k/v rows in
/// [B, N, H, D] layout), with num_threads (0 = default) threads: the memory planner's figure.
int64_t fold_workspace_bytes(const AttentionSpec& spec, int64_t batch, int64_t heads,
                             int64_t head_dim, int64_t q_len, int64_t kv_len, DType dtype,
                             int num_threads);

/// Normalises the state: o = acc / l (with learned sink logits [H] f32 in the denominator when
/// sink_logits is non-null and defined), lse [B, H, Nq] f32 natural log (lse may be null).
/// o is [B, Nq, H, D] of any dtype (written with round to nearest even).
void finalize(const SoftmaxStateCpu& state, const TensorView* sink_logits, const TensorView& o,
              const TensorView* lse);

/// One-shot attention on one process: reset, one fold over all of k/v, finalize.
FoldStats attention(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                    const TensorView& k, const TensorView& v, const int64_t* k_pos,
                    const TensorView* sink_logits, const TensorView& o, const TensorView* lse,
                    int num_threads = 0);

}  // namespace ringattn::cpu
