#pragma once
// Tile machinery shared by the CPU forward (attention_cpu.cc) and backward
// (attention_cpu_bwd.cc) kernels: position bounds of a tile, the tile classification against the
// mask, the per-element mask of a score row, key tiling, and reading rows of a [B, N, H, D]
// tensor as f32. Internal to kernels/cpu.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/tile_classify.h"
#include "ringattn/attention.h"
#include "ringattn/memory.h"

namespace ringattn::cpu::detail {

using ringattn::TileKind;

struct Bounds {
  int64_t lo = std::numeric_limits<int64_t>::max();
  int64_t hi = std::numeric_limits<int64_t>::min();
};

inline Bounds bounds_of(const int64_t* pos, int64_t begin, int64_t end) {
  Bounds b;
  for (int64_t i = begin; i < end; ++i) {
    b.lo = std::min(b.lo, pos[i]);
    b.hi = std::max(b.hi, pos[i]);
  }
  return b;
}

// The tile's relation to the mask from the positions' bounding boxes (kernels/tile_classify.h).
inline TileKind classify(const AttentionSpec& spec, Bounds q, Bounds k) {
  return classify_tile(spec.causal, spec.window, spec.sinks, q.lo, q.hi, k.lo, k.hi);
}

// Pointer and row stride (elements) of `rows` rows of one head of a [B, N, H, D] tensor as f32:
// in place when the tensor is f32 with a BLAS-compatible row stride, else converted to buf.
inline const float* rows_as_f32(const TensorView& t, int64_t b, int64_t n0, int64_t rows, int64_t h,
                                HostVector<float>& buf, int64_t* ld) {
  const int64_t d = t.size(3);
  const int64_t base = b * t.stride(0) + n0 * t.stride(1) + h * t.stride(2);
  if (t.dtype() == DType::kF32 && (t.stride(1) >= d || rows == 1)) {
    *ld = std::max(t.stride(1), d);
    return t.data_as<const float>() + base;
  }
  buf.resize(static_cast<size_t>(rows * d));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = base + r * t.stride(1);
    float* dst = buf.data() + r * d;
    switch (t.dtype()) {
      case DType::kBF16: {
        const BF16* src = t.data_as<const BF16>() + off;
        for (int64_t c = 0; c < d; ++c) dst[c] = bf16_to_float(src[c]);
        break;
      }
      case DType::kF16: {
        const F16* src = t.data_as<const F16>() + off;
        for (int64_t c = 0; c < d; ++c) dst[c] = f16_to_float(src[c]);
        break;
      }
      default:
        std::memcpy(dst, t.data_as<const float>() + off, static_cast<size_t>(d) * 4);
        break;
    }
  }
  *ld = d;
  return buf.data();
}

// Gives buf a capacity of at least `floats` in one allocation (the old buffer freed first), so
// that a per-thread buffer's capacity is the largest size ever asked for, whatever the order of
// the requests (std::vector growth would otherwise depend on it): the kernels' workspace
// functions count exactly this.
inline void reserve_exact(HostVector<float>& buf, int64_t floats) {
  if (buf.capacity() >= static_cast<size_t>(floats)) return;
  HostVector<float>().swap(buf);
  buf.reserve(static_cast<size_t>(floats));
}

// Sets masked logits of one score row to -inf. Branch-free so that it vectorises.
inline void mask_row(const AttentionSpec& spec, int64_t qi, const int64_t* k_pos, float* s,
                     int64_t n) {
  const bool causal = spec.causal;
  const int64_t w = spec.window, sinks = spec.sinks;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t kj = k_pos[j];
    const int64_t d = qi - kj;
    const bool in_window = w == 0 || kj < sinks || (d < w && (causal || -d < w));
    const bool vis = (!causal || kj <= qi) && in_window;
    s[j] = vis ? s[j] : -std::numeric_limits<float>::infinity();
  }
}

// Cuts the block's keys into tiles of at most tile_k. With a window and sinks, a new tile also
// starts wherever a run of sink keys (position < S) begins or ends: the sinks are visible to
// every query, so a tile mixing them with ordinary keys could never be skipped and every query
// tile would pay for a whole key tile. Arbitrary (unsorted) positions could make that
// cutting degenerate; then we keep plain fixed-size tiles.
inline void make_key_tiles(const AttentionSpec& spec, const int64_t* k_pos, int64_t kv_len,
                           int64_t tile_k, std::vector<int64_t>& begin,
                           std::vector<Bounds>& bounds) {
  const int64_t regular = (kv_len + tile_k - 1) / tile_k;
  begin.clear();
  if (spec.window > 0 && spec.sinks > 0) {
    int64_t start = 0;
    for (int64_t j = 1; j <= kv_len; ++j) {
      if (j == kv_len || j - start == tile_k ||
          (k_pos[j] < spec.sinks) != (k_pos[j - 1] < spec.sinks)) {
        begin.push_back(start);
        start = j;
      }
    }
    if (static_cast<int64_t>(begin.size()) > regular + 8) begin.clear();
  }
  if (begin.empty()) {
    for (int64_t t = 0; t < regular; ++t) begin.push_back(t * tile_k);
  }
  begin.push_back(kv_len);
  bounds.clear();
  for (size_t t = 0; t + 1 < begin.size(); ++t) {
    bounds.push_back(bounds_of(k_pos, begin[t], begin[t + 1]));
  }
}

}  // namespace ringattn::cpu::detail
