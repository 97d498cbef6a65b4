#pragma once
/// The CPU attention backward (SPEC section 5): blockwise like the forward, recomputing the
/// probabilities P = exp(S - lse) from the saved lse (no N x N matrix is ever stored),
/// dS = P * (dO V^T - Delta) with Delta = rowsum(dO * O), and the five block products
/// S = Q K^T, dP = dO V^T, dV += P^T dO, dK += dS^T Q, dQ += dS K in CBLAS. The ring calls
/// fold_block_backward once per K/V block it holds; dq accumulates in the state, dk/dv in f32
/// accumulators that belong to the block (they travel with it around the ring).
///
/// Shapes: q, o, dout [B, Nq, H, D]; k, v [B, Nk, H_kv, D] (f32, bf16 or f16; innermost dim
/// contiguous, other strides free); lse [B, H, Nq] f32; q_pos [Nq], k_pos [Nk] GLOBAL
/// positions. GQA: dk/dv of kv head hk sum the query heads hk*G .. hk*G+G-1 (G = H / H_kv).

#include <cstdint>

#include "kernels/cpu/attention_cpu.h"

namespace ringattn::cpu {

/// What the backward keeps per query across K/V blocks: lse and Delta = rowsum(dout * o) as
/// [B, H, Nq] f32, and the f32 dq accumulator [B, Nq, H, D].
class BackwardStateCpu {
 public:
  BackwardStateCpu() = default;
  /// Sizes the state for o's shape, copies lse, computes Delta from o and dout (o's shape, any
  /// dtype) and sets dq = 0. Throws Error on bad shapes.
  void begin(const TensorView& o, const TensorView& dout, const TensorView& lse);

  int64_t batch() const { return batch_; }
  int64_t q_len() const { return q_len_; }
  int64_t heads() const { return heads_; }
  int64_t head_dim() const { return head_dim_; }
  const float* lse() const { return lse_.data(); }
  const float* delta() const { return delta_.data(); }
  float* dq() { return dq_.data(); }
  const float* dq() const { return dq_.data(); }

 private:
  int64_t batch_ = 0, q_len_ = 0, heads_ = 0, head_dim_ = 0;
  HostVector<float> lse_, delta_, dq_;
};

/// Folds one K/V block into the backward: state.dq += dS K for the queries, and
/// dk += dS^T Q, dv += P^T dO for the block's keys. dk, dv are f32 [B, Nk, H_kv, D]
/// accumulators (innermost dim contiguous, other strides free), added to, never overwritten.
/// Blocking; threads over (batch, kv head, key tile), so dk/dv rows are owned by one thread;
/// dq tiles are added under a per-tile lock. num_threads 0 = default_num_threads().
/// Fully masked tiles are skipped. FoldStats::flops counts the five products (10 * rows *
/// keys * D per computed tile).
FoldStats fold_block_backward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                              const TensorView& k, const TensorView& v, const int64_t* k_pos,
                              const TensorView& dout, BackwardStateCpu& state, const TensorView& dk,
                              const TensorView& dv, int num_threads = 0);

/// Bytes of kernel workspace (accounted, per thread, kept between calls; separate from
/// fold_block's) that fold_block_backward holds after folding kv_len keys into q_len queries of
/// this shape, with q, dout, k and v in `dtype`, with num_threads (0 = default) threads: the
/// memory planner's figure. Exact with one thread; with several it counts every thread that may
/// run an item (items from the key tiling of keys that are all sinks or all ordinary, as in
/// every fold of the ring).
int64_t backward_workspace_bytes(const AttentionSpec& spec, int64_t batch, int64_t kv_heads,
                                 int64_t head_dim, int64_t q_len, int64_t kv_len, DType dtype,
                                 int num_threads);

/// Adds this state's rows to the learned-sink gradient: dsink[h] -= sum over (b, i) of
/// exp(z_h - lse_i) * Delta_i. sink_logits [H] f32; dsink points at H floats.
void sink_logits_backward(const BackwardStateCpu& state, const TensorView& sink_logits,
                          float* dsink);

/// Writes dq (o's shape, any dtype, round to nearest even) from the state's accumulator.
void finalize_backward(const BackwardStateCpu& state, const TensorView& dq);

/// One-shot backward on one process: dq like q, dk and dv like k (any dtype), and, when both
/// sink_logits and dsink are given, dsink [H] f32 (overwritten). o and lse are the forward's.
FoldStats attention_backward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                             const TensorView& k, const TensorView& v, const int64_t* k_pos,
                             const TensorView* sink_logits, const TensorView& o,
                             const TensorView& lse, const TensorView& dout, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, const TensorView* dsink,
                             int num_threads = 0);

}  // namespace ringattn::cpu
