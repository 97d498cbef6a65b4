#pragma once
/// The online-softmax state and its merge, written once for host and device.
///
/// Per query row the state is (m, l, acc[D]):
///   m   running maximum of the scaled logits seen so far (-inf: nothing seen yet),
///   l   sum of exp(s_j - m) over the keys seen,
///   acc sum of exp(s_j - m) * v_j (f32, unnormalised).
/// Every logit is already multiplied by the scale, so m, lse and learned sink logits z live in
/// one space (natural log). Layouts used across the project: m, l as [B, H, N] (like lse),
/// acc as [B, N, H, D] (like o).
///
/// Edge cases, all handled here and nowhere else:
///   * m == -inf means an empty row: its l and acc are 0 and it contributes nothing to a merge
///     (we never evaluate exp(-inf - -inf), which would be NaN).
///   * A logit gap of more than ~88 between the old and new maximum makes the rescale factor
///     underflow to 0 (or a subnormal), never overflow, because we always rescale DOWN towards
///     the larger maximum.
///   * A learned sink logit z adds exp(z) to the denominator only; finalisation rescales to
///     max(m, z), so z = +-20 next to logits of any size cannot overflow.
///   * A row with no visible key and no sink finalises to o = 0 and lse = -inf, never NaN.

#include <cmath>

#include "ringattn/macros.h"

namespace ringattn {

RINGATTN_HD float neg_inf() { return -INFINITY; }

/// exp(m_old - m_new) for m_new >= m_old; 0 when m_old is -inf (an empty state).
RINGATTN_HD float rescale_factor(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
}

/// Raises a row's running max to cover a block whose (masked, scaled) maximum is block_max.
/// Returns the factor by which the row's existing l and acc must be multiplied. After the call
/// the block's probabilities are exp(s_j - m); if m is still -inf the block was fully masked
/// and must contribute nothing (callers skip it).
RINGATTN_HD float advance_max(float& m, float block_max) {
  const float m_new = m > block_max ? m : block_max;
  const float alpha = rescale_factor(m, m_new);
  m = m_new;
  return alpha;
}

/// Folds one row of n scaled, masked logits s (masked = -inf) with their value rows into the
/// state; value(j, c) returns element c of value row j as float. The reference fold: kernels
/// may vectorise it but must keep its arithmetic.
template <typename ValueFn>
RINGATTN_HD void fold_row(float& m, float& l, float* acc, int acc_stride, int d, const float* s,
                          int n, ValueFn value) {
  float block_max = -INFINITY;
  for (int j = 0; j < n; ++j) block_max = s[j] > block_max ? s[j] : block_max;
  if (block_max == -INFINITY) return;  // fully masked: the state is unchanged
  const float alpha = advance_max(m, block_max);
  l *= alpha;
  for (int c = 0; c < d; ++c) acc[c * acc_stride] *= alpha;
  for (int j = 0; j < n; ++j) {
    if (s[j] == -INFINITY) continue;
    const float p = expf(s[j] - m);
    l += p;
    for (int c = 0; c < d; ++c) acc[c * acc_stride] += p * value(j, c);
  }
}

/// Merges state b into state a (same row, same keys never counted twice). Order-independent
/// up to f32 rounding. Empty states (m == -inf) are identities.
RINGATTN_HD void merge_rows(float& m_a, float& l_a, float* acc_a, int stride_a, float m_b,
                            float l_b, const float* acc_b, int stride_b, int d) {
  if (m_b == -INFINITY) return;
  const float m = m_a > m_b ? m_a : m_b;
  const float fa = rescale_factor(m_a, m);
  const float fb = rescale_factor(m_b, m);
  for (int c = 0; c < d; ++c)
    acc_a[c * stride_a] = acc_a[c * stride_a] * fa + acc_b[c * stride_b] * fb;
  l_a = l_a * fa + l_b * fb;
  m_a = m;
}

/// Merges a finished (o, lse) pair into another: the normalised form of merge_rows, used
/// when partial results are exchanged instead of states (decode across ranks). lse == -inf
/// means an empty partial.
RINGATTN_HD void merge_normalised(float& lse_a, float* o_a, float lse_b, const float* o_b, int d) {
  if (lse_b == -INFINITY) return;
  if (lse_a == -INFINITY) {
    for (int c = 0; c < d; ++c) o_a[c] = o_b[c];
    lse_a = lse_b;
    return;
  }
  const float m = lse_a > lse_b ? lse_a : lse_b;
  const float wa = expf(lse_a - m), wb = expf(lse_b - m);
  const float inv = 1.0f / (wa + wb);
  for (int c = 0; c < d; ++c) o_a[c] = (o_a[c] * wa + o_b[c] * wb) * inv;
  lse_a = m + logf(wa + wb);
}

/// Final normalisation of one row. With a learned sink logit (has_sink), exp(z) joins the
/// denominator only. Returns the factor f with o = acc * f, and writes lse (natural log).
/// No key and no sink: f = 0, lse = -inf. No key but a sink: f = 0, lse = z.
RINGATTN_HD float finalize_row(float m, float l, bool has_sink, float z, float* lse) {
  if (!has_sink) {
    if (m == -INFINITY || !(l > 0.0f)) {
      *lse = -INFINITY;
      return 0.0f;
    }
    *lse = m + logf(l);
    return 1.0f / l;
  }
  if (m == -INFINITY || !(l > 0.0f)) {
    *lse = z;
    return 0.0f;
  }
  const float big = m > z ? m : z;
  const float lm = l * expf(m - big);
  const float denom = lm + expf(z - big);
  *lse = big + logf(denom);
  return expf(m - big) / denom;
}

}  // namespace ringattn
