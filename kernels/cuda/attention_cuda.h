#pragma once
/// The CUDA attention kernels: host launchers for the same block fold as the CPU kernel
/// (kernels/cpu/attention_cpu{,_bwd}.h), so the ring runs unchanged on a GPU. Built only when
/// RINGATTN_WITH_CUDA; no CUDA types in this header.
///
/// Every pointer and TensorView here is DEVICE memory. Launches are asynchronous on `stream`;
/// bad shapes throw ringattn::Error before anything is queued, launch failures throw
/// Error(kCuda). Shapes (FlashAttention "bshd"): q, o, dout [B, Nq, H, D]; k, v [B, Nk, H_kv, D];
/// the innermost dimension contiguous, the other strides free (a slice of a larger buffer is a
/// valid block). q_pos [Nq], k_pos [Nk]: int64 GLOBAL positions (masks use only these).
///
/// Kernels: bf16 and f16 with D = 64 or 128 take the tensor-core kernels (mma.sync m16n8k16,
/// f32 accumulation, K/V tiles staged through shared memory with cp.async double buffering,
/// fully masked tiles skipped from the position bounds). Every other case (f32, any other
/// D <= 256) takes the generic kernel (f32 FMA). $RINGATTN_CUDA_KERNEL=generic forces the
/// generic kernels (tests compare both against the oracle).

#include <cstdint>

#include "ringattn/attention.h"
#include "ringattn/tensor.h"

typedef struct CUstream_st* cudaStream_t;

namespace ringattn::cuda {

/// Which kernel family runs a fold.
enum class KernelChoice { kAuto, kTensorCore, kGeneric };
/// kAuto unless $RINGATTN_CUDA_KERNEL says "mma" (kTensorCore) or "generic".
KernelChoice kernel_choice_from_env();
/// Whether the tensor-core kernels handle this dtype and head dim.
bool tensor_core_supported(DType dtype, int64_t head_dim);

/// Bytes of the per-thread tile-bounds scratch (device memory, grow-only, kept between calls and
/// shared by the forward and backward folds of a host thread) after one fold of q_len queries
/// over k_len keys: 16 bytes per query tile and per key tile. The forward tiles by 64; the
/// backward by 64 on the tensor-core path and by 32 (D <= 128) or 16 on the generic one. The
/// memory planner's figure (header-only: the planner builds without CUDA).
inline int64_t fold_scratch_bytes(bool backward, DType dtype, int64_t head_dim, int64_t q_len,
                                  int64_t k_len) {
  const bool tc =
      (dtype == DType::kBF16 || dtype == DType::kF16) && (head_dim == 64 || head_dim == 128);
  const int64_t tile = !backward || tc ? 64 : (head_dim <= 128 ? 32 : 16);
  return 16 * ((q_len + tile - 1) / tile + (k_len + tile - 1) / tile);
}

/// f32 online-softmax state of a block of queries, in device memory owned by the caller:
/// m, l [B, H, Nq] and acc [B, Nq, H, D], all contiguous (see kernels/softmax_state.h).
struct ForwardState {
  float* m = nullptr;
  float* l = nullptr;
  float* acc = nullptr;
  int64_t batch = 0, q_len = 0, heads = 0, head_dim = 0;
  /// Bytes the three arrays take.
  static int64_t bytes(int64_t batch, int64_t q_len, int64_t heads, int64_t head_dim) {
    return (2 * batch * heads * q_len + batch * q_len * heads * head_dim) * 4;
  }
};

/// Empties the state: m = -inf, l = 0, acc = 0.
void reset_state(const ForwardState& st, cudaStream_t stream);

/// The decode merge (the KV cache): with mx [B, H, Nq] the maxima of st.m over every rank (a
/// MAX allreduce), writes sums = l * exp(m - mx) ([B, H, Nq]) and acc_out = acc * exp(m - mx)
/// ([B, Nq, H, D]); a row with m = -inf (nothing visible on this rank) contributes 0. The
/// arithmetic of the CPU merge (kernels/softmax_state.h rescale_factor). Device pointers.
void rescale_state(const ForwardState& st, const float* mx, float* sums, float* acc_out,
                   cudaStream_t stream);

/// Grows the calling thread's tile-bounds scratch (see fold_scratch_bytes) to what a forward
/// fold of q_len queries over k_len keys needs, so such folds allocate nothing later.
void reserve_fold_scratch(int64_t q_len, int64_t k_len);

/// Tile counts of a fold, computed on the host from the positions' bounds per tile exactly as
/// the kernel decides (host copies of the positions).
struct TileCount {
  int64_t computed = 0, skipped = 0;
  double flops = 0.0;  ///< 4 * rows * keys * D per computed tile (forward)
};
TileCount count_tiles(const AttentionSpec& spec, DType dtype, int64_t head_dim, int64_t batch,
                      int64_t heads, const int64_t* q_pos_host, int64_t q_len,
                      const int64_t* k_pos_host, int64_t k_len);

/// Folds one K/V block into `st` (sized for q). q, k, v: bf16, f16 or f32 (one dtype).
void fold_forward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                  const TensorView& k, const TensorView& v, const int64_t* k_pos,
                  const ForwardState& st, cudaStream_t stream,
                  KernelChoice choice = KernelChoice::kAuto);

/// o = acc / l (with the learned sink term exp(z_h) in the denominator when sink_logits, [H]
/// f32, is non-null), lse [B, H, Nq] f32 when non-null; o of any dtype, strided like q.
void finalize_forward(const ForwardState& st, const float* sink_logits, const TensorView& o,
                      float* lse, cudaStream_t stream);

/// What the backward keeps per query across K/V blocks (device memory owned by the caller):
/// lse and delta [B, H, Nq] f32, the f32 dq accumulator [B, Nq, H, D] (contiguous).
struct BackwardState {
  const float* lse = nullptr;
  float* delta = nullptr;
  float* dq = nullptr;
  int64_t batch = 0, q_len = 0, heads = 0, head_dim = 0;
};

/// delta = rowsum(dout * o) (o, dout [B, Nq, H, D], any dtype) and dq = 0.
void backward_begin(const TensorView& o, const TensorView& dout, const BackwardState& st,
                    cudaStream_t stream);

/// Folds one K/V block into the backward: st.dq += dS K for the queries; dk += dS^T Q and
/// dv += P^T dO for the block's keys (dk, dv: f32 [B, Nk, H_kv, D] accumulators, innermost dim
/// contiguous, other strides free; added to, never overwritten). GQA: dk/dv of kv head hk sum
/// the query heads hk*G .. hk*G+G-1. P = exp(scale * q.k - lse) recomputed from the saved lse.
void fold_backward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                   const TensorView& k, const TensorView& v, const int64_t* k_pos,
                   const TensorView& dout, const BackwardState& st, const TensorView& dk,
                   const TensorView& dv, cudaStream_t stream,
                   KernelChoice choice = KernelChoice::kAuto);

/// dsink[h] -= sum over (b, i) of exp(z_h - lse_i) * delta_i (adds into dsink, [H] f32).
void sink_logits_backward(const BackwardState& st, const float* sink_logits, float* dsink,
                          cudaStream_t stream);

/// out (any dtype, [B, N, H, D] strided, innermost contiguous) = acc ([B, N, H, D] f32
/// contiguous), round to nearest even.
void store_f32(const float* acc, const TensorView& out, cudaStream_t stream);

/// dst += src for two f32 [B, N, H, D] views of one shape (innermost contiguous, strides free).
void add_f32(const TensorView& dst, const TensorView& src, cudaStream_t stream);

}  // namespace ringattn::cuda
