#pragma once
/// How a (query tile, key tile) pair relates to the mask, decided from the bounding box of the
/// tiles' GLOBAL positions alone; written once for the CPU and CUDA kernels (host and device).
///
/// Every (i, j) of the tile lies in [q_lo, q_hi] x [k_lo, k_hi], so "no point of the box is
/// visible" implies the tile is fully masked (kSkip) and "every point of the box is visible"
/// implies no element needs the mask (kFull), whatever the order of the positions inside;
/// anything else is kPartial (the exact per-element visible() of ringattn/attention.h).

#include <cstdint>

#include "ringattn/macros.h"

namespace ringattn {

enum class TileKind : int { kSkip = 0, kFull = 1, kPartial = 2 };

RINGATTN_HD TileKind classify_tile(bool causal, int64_t window, int64_t sinks, int64_t q_lo,
                                   int64_t q_hi, int64_t k_lo, int64_t k_hi) {
  // Some visible pair must have j <= i (causal) and, unless a key may be a sink, |i - j| < W.
  if (causal && k_lo > q_hi) return TileKind::kSkip;
  if (window > 0 && k_lo >= sinks) {
    // i - j ranges over [q_lo - k_hi, q_hi - k_lo].
    if (q_lo - k_hi >= window) return TileKind::kSkip;
    if (!causal && k_lo - q_hi >= window) return TileKind::kSkip;
  }
  const bool causal_ok = !causal || k_hi <= q_lo;
  bool window_ok = window == 0 || k_hi < sinks;
  if (!window_ok) window_ok = q_hi - k_lo < window && (causal || k_hi - q_lo < window);
  return causal_ok && window_ok ? TileKind::kFull : TileKind::kPartial;
}

}  // namespace ringattn
