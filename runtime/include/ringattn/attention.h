#pragma once
/// What attention is computed (SPEC sections 2 and 3) and the public entry points.
///
/// Conventions (as FlashAttention): q, o are [B, N_local, H, D] ("bshd"), k, v are
/// [B, N_local, H_kv, D]; lse is [B, H, N_local] f32 in natural log; sink_logits is [H] f32.
/// Masks are computed from GLOBAL token positions, so any shard layout gives the same answer.

#include <cstdint>
#include <string>

#include "ringattn/tensor.h"

namespace ringattn {

/// How the global sequence is cut into per-rank shards (SPEC section 3).
enum class Layout : uint8_t {
  kAuto = 0,        ///< zigzag for causal attention with no window, contiguous otherwise
  kContiguous = 1,  ///< rank r holds one slice; the first N % P ranks hold one token more
  kZigzag = 2,      ///< 2P chunks; rank r holds chunks r and 2P-1-r, in that order
};
const char* layout_name(Layout layout);
/// Parses "auto" | "contiguous" | "zigzag"; throws Error otherwise.
Layout parse_layout(const std::string& name);

/// Which keys a query sees, and how scores are scaled.
struct AttentionSpec {
  bool causal = false;
  /// Sliding window W (0 = unlimited). Causal: i - j < W; otherwise |i - j| < W.
  int64_t window = 0;
  /// Number of global sink tokens S: positions 0..S-1 are visible to every query the causal
  /// mask allows, whatever the window.
  int64_t sinks = 0;
  /// Score scale; 0 means 1/sqrt(D).
  float scale = 0.0f;
  Layout layout = Layout::kAuto;
};

/// The scale actually used for head dimension d.
float effective_scale(const AttentionSpec& spec, int64_t head_dim);

/// visible(i, j) of SPEC section 2, for global query position i and key position j.
RINGATTN_HD bool visible(bool causal, int64_t window, int64_t sinks, int64_t i, int64_t j) {
  if (causal && j > i) return false;
  if (window == 0 || j < sinks) return true;
  const int64_t d = i - j;
  return causal ? d < window : (d < window && -d < window);
}
inline bool visible(const AttentionSpec& s, int64_t i, int64_t j) {
  return visible(s.causal, s.window, s.sinks, i, j);
}

/// Checks the spec alone (window >= 0, sinks >= 0, finite non-negative scale).
void validate_spec(const AttentionSpec& spec);

/// Shapes of one attention problem, read off q and k.
struct AttentionShape {
  int64_t batch = 0, q_len = 0, kv_len = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int64_t group() const { return heads / kv_heads; }
};

/// Validates q [B, Nq, H, D], k and v [B, Nk, H_kv, D] (same dtype, H % H_kv == 0,
/// innermost dimension contiguous), optional o like q, lse [B, H, Nq] f32 and sink_logits
/// [H] f32, and the spec. Throws Error naming the first problem. Returns the shapes.
AttentionShape check_attention_args(const AttentionSpec& spec, const TensorView& q,
                                    const TensorView& k, const TensorView& v, const TensorView* o,
                                    const TensorView* lse, const TensorView* sink_logits);

}  // namespace ringattn
