#pragma once
/// The oracle: naive attention with f64 accumulation implementing all of SPEC section 2.
/// Never optimised; every fast path (CPU kernel, ring, decode, CUDA) is tested against it.

#include <cstdint>
#include <vector>

#include "ringattn/attention.h"

namespace ringattn::ref {

/// Dense result in f64: o [B, Nq, H, D] and lse [B, H, Nq] (natural log, -inf for a row with
/// no visible key and no learned sink).
struct RefOutput {
  std::vector<double> o;
  std::vector<double> lse;
};

/// Forward attention of queries q [B, Nq, H, D] at global positions q_pos[Nq] over keys
/// k, v [B, Nk, H_kv, D] at global positions k_pos[Nk] (any dtype; read as f64), with the
/// spec's mask and optional learned sink logits [H] f32 (nullptr or an empty view: none).
RefOutput attention_forward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                            const TensorView& k, const TensorView& v, const int64_t* k_pos,
                            const TensorView* sink_logits);

/// Gradients of the reference, f64: dq like q, dk and dv like k, dsink [H] (zeros without
/// sink logits). dout is [B, Nq, H, D].
struct RefGrads {
  std::vector<double> dq, dk, dv, dsink;
};
RefGrads attention_backward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                            const TensorView& k, const TensorView& v, const int64_t* k_pos,
                            const TensorView* sink_logits, const TensorView& dout);

}  // namespace ringattn::ref
