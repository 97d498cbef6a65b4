// The blockwise CPU kernel. One work item is (batch, head, query tile); it walks the key tiles
// of the block, and for each: S = scale * Q K^T (sgemm), mask, online-softmax update of the
// tile's rows (vectorised), acc += P V (sgemm, straight into the state's [B, N, H, D] acc).
// The state arithmetic (advance_max, finalize_row) is the shared one of softmax_state.h.

#include "kernels/cpu/attention_cpu.h"
#include "ringattn/memory.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>

#include <cblas.h>

#include "kernels/cpu/attention_tiles.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/vec_math.h"
#include "kernels/softmax_state.h"

namespace ringattn::cpu {
namespace {

using detail::bounds_of;
using detail::Bounds;
using detail::classify;
using detail::mask_row;
using detail::reserve_exact;
using detail::rows_as_f32;
using detail::TileKind;

// Tile sizes. A query tile is the M of both products; a key tile is the N of Q K^T and the K of
// P V. OpenBLAS packs both operands on every call, so large tiles amortise the packing: on the
// 2-core EPYC (1 MiB L2 per core) 512 x 256 reached ~90% of single-thread sgemm at D = 128 where
// 128 x 512 reached ~75% (docs/PERFORMANCE.md). The 512 KiB score tile stays in L2 between the
// two products.
constexpr int64_t kTileQ = 512;
constexpr int64_t kTileK = 256;
// Query tiles shrink (down to kMinTileQ) until there are at least two work items per thread.
constexpr int64_t kMinTileQ = 64;
// Rows per re-classified chunk of a partially masked tile.
constexpr int64_t kSubTileQ = 128;
// With a sliding window, a query tile needs about tile_q + W keys: key tiles shrink towards the
// window (never below kMinTileK, where BLAS calls get too small to pay off).
constexpr int64_t kMinTileK = 64;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-thread buffers, reused across calls: the score tile and f32 copies of q/k/v tiles when
// the inputs are bf16/f16 (or rows are not usable in place). Accounted as kernel workspace.
struct Scratch {
  HostVector<float> s, q, k, v;
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// The tiling of a fold of q_len queries for bh = batch x heads rows with `threads` threads: the
// one choice both fold_block and fold_workspace_bytes use.
struct Tiles {
  int64_t tile_q = kTileQ, tile_k = kTileK;
  int64_t q_tiles = 0;  // work items are bh x q_tiles
};

Tiles choose_tiles(const AttentionSpec& spec, int64_t bh, int64_t q_len, int threads) {
  Tiles t;
  auto tiles_of = [&](int64_t tile) { return (q_len + tile - 1) / tile; };
  while (t.tile_q > kMinTileQ && bh * tiles_of(t.tile_q) < 2 * threads) t.tile_q /= 2;
  t.q_tiles = tiles_of(t.tile_q);
  if (spec.window > 0) {
    t.tile_k = std::clamp((spec.window + kMinTileK - 1) / kMinTileK * kMinTileK, kMinTileK, kTileK);
  }
  return t;
}

// Floats of each per-thread buffer (Scratch) for one fold: the score tile always, f32 copies of
// q rows and k, v key tiles only when the inputs are converted (not f32).
struct ScratchFloats {
  int64_t s = 0, q = 0, k = 0, v = 0;
  int64_t total() const { return s + q + k + v; }
};

ScratchFloats scratch_floats(const Tiles& t, int64_t q_len, int64_t kv_len, int64_t head_dim,
                             bool convert) {
  ScratchFloats f;
  f.s = t.tile_q * t.tile_k;
  if (convert) {
    f.q = std::min(t.tile_q, q_len) * head_dim;
    f.k = f.v = std::min(t.tile_k, kv_len) * head_dim;
  }
  return f;
}

struct Problem {
  AttentionSpec spec;
  AttentionShape shape;
  float scale = 1.0f;
  int64_t tile_q = kTileQ, tile_k = kTileK;
  int64_t q_tiles = 0;
  // Key tiles as [begin, end) ranges of the block with their position bounds.
  std::vector<int64_t> k_begin;
  std::vector<Bounds> k_bounds;
};

// Rows [r0, r1) of a query tile against one key tile: S = scale Q K^T, mask (kPartial), online
// softmax of each row, acc += P V. qp, m, l and acc point at row 0 of the tile.
struct TileArgs {
  const float* qp;
  int64_t ldq;
  const float* kp;
  int64_t ldk;
  const float* vp;
  int64_t ldv;
  const int64_t* q_pos;  // of row 0 of the tile
  const int64_t* k_pos;  // of key 0 of the key tile
  int64_t keys;
  float* m;
  float* l;
  float* acc;
  int64_t ld_acc;
};

void compute_rows(const Problem& p, const TileArgs& t, int64_t r0, int64_t r1, TileKind kind,
                  float* sc) {
  const int64_t d = p.shape.head_dim, keys = t.keys, rows = r1 - r0;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
              static_cast<int>(keys), static_cast<int>(d), p.scale, t.qp + r0 * t.ldq,
              static_cast<int>(t.ldq), t.kp, static_cast<int>(t.ldk), 0.0f, sc,
              static_cast<int>(keys));
  for (int64_t r = r0; r < r1; ++r) {
    float* srow = sc + (r - r0) * keys;
    if (kind == TileKind::kPartial) mask_row(p.spec, t.q_pos[r], t.k_pos, srow, keys);
    const float row_max_s = row_max(srow, keys);
    if (row_max_s == kNegInf) {
      // Fully masked row in this tile: the state must not change, and P V must add 0.
      std::memset(srow, 0, static_cast<size_t>(keys) * sizeof(float));
      continue;
    }
    const float alpha = advance_max(t.m[r], row_max_s);
    if (alpha != 1.0f) {
      t.l[r] *= alpha;
      scale_row(t.acc + r * t.ld_acc, d, alpha);
    }
    t.l[r] += exp_shift_sum(srow, keys, t.m[r]);
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
              static_cast<int>(d), static_cast<int>(keys), 1.0f, sc, static_cast<int>(keys), t.vp,
              static_cast<int>(t.ldv), 1.0f, t.acc + r0 * t.ld_acc, static_cast<int>(t.ld_acc));
}

// One (batch, head, query tile) work item over every key tile of the block. Fully visible
// tiles run as one pair of large products; a partially masked tile (the causal diagonal, the
// edges of a window) is re-classified in chunks of kSubTileQ rows, so that the masked
// triangle of a large query tile is mostly skipped rather than computed and thrown away.
void fold_item(const Problem& p, const TensorView& q, const int64_t* q_pos, const TensorView& k,
               const TensorView& v, const int64_t* k_pos, int64_t b, int64_t h, int64_t qt,
               SoftmaxStateCpu& state, FoldStats& stats) {
  const AttentionShape& s = p.shape;
  const int64_t d = s.head_dim;
  const int64_t hk = h / s.group();
  const int64_t q0 = qt * p.tile_q;
  const int64_t rows = std::min(p.tile_q, s.q_len - q0);
  const Bounds qb = bounds_of(q_pos, q0, q0 + rows);
  std::vector<Bounds> sub_bounds;
  for (int64_t r = 0; r < rows; r += kSubTileQ) {
    sub_bounds.push_back(bounds_of(q_pos, q0 + r, q0 + std::min(rows, r + kSubTileQ)));
  }

  // Every buffer gets its whole capacity at once, so no growth pattern depends on which item a
  // thread runs first (fold_workspace_bytes counts this).
  Scratch& scratch = thread_scratch();
  const ScratchFloats sf = scratch_floats(Tiles{p.tile_q, p.tile_k, p.q_tiles}, s.q_len, s.kv_len,
                                          d, q.dtype() != DType::kF32);
  reserve_exact(scratch.s, sf.s);
  scratch.s.resize(static_cast<size_t>(sf.s));
  float* sc = scratch.s.data();
  reserve_exact(scratch.q, sf.q);
  reserve_exact(scratch.k, sf.k);
  reserve_exact(scratch.v, sf.v);
  TileArgs t{};
  t.q_pos = q_pos + q0;
  t.m = state.m() + (b * s.heads + h) * s.q_len + q0;
  t.l = state.l() + (b * s.heads + h) * s.q_len + q0;
  t.ld_acc = s.heads * d;
  t.acc = state.acc() + ((b * s.q_len + q0) * s.heads + h) * d;

  for (size_t kt = 0; kt < p.k_bounds.size(); ++kt) {
    const TileKind kind = classify(p.spec, qb, p.k_bounds[kt]);
    if (kind == TileKind::kSkip) {
      ++stats.tiles_skipped;
      continue;
    }
    const int64_t k0 = p.k_begin[kt];
    t.keys = p.k_begin[kt + 1] - k0;
    t.k_pos = k_pos + k0;
    // q is converted lazily: an item whose tiles are all skipped never reads it.
    if (t.qp == nullptr) t.qp = rows_as_f32(q, b, q0, rows, h, scratch.q, &t.ldq);
    t.kp = rows_as_f32(k, b, k0, t.keys, hk, scratch.k, &t.ldk);
    t.vp = rows_as_f32(v, b, k0, t.keys, hk, scratch.v, &t.ldv);
    int64_t computed_rows = 0;
    if (kind == TileKind::kFull) {
      compute_rows(p, t, 0, rows, kind, sc);
      computed_rows = rows;
    } else {
      for (size_t c = 0; c < sub_bounds.size(); ++c) {
        const TileKind sub = classify(p.spec, sub_bounds[c], p.k_bounds[kt]);
        if (sub == TileKind::kSkip) continue;
        const int64_t r0 = static_cast<int64_t>(c) * kSubTileQ;
        const int64_t r1 = std::min(rows, r0 + kSubTileQ);
        compute_rows(p, t, r0, r1, sub, sc);
        computed_rows += r1 - r0;
      }
    }
    ++stats.tiles_computed;
    stats.flops += 4.0 * static_cast<double>(computed_rows) * static_cast<double>(t.keys) *
                   static_cast<double>(d);
  }
}

}  // namespace

void SoftmaxStateCpu::reset(int64_t batch, int64_t q_len, int64_t heads, int64_t head_dim) {
  RINGATTN_CHECK(batch >= 0 && q_len >= 0 && heads >= 0 && head_dim >= 0,
                 "softmax state sizes must be >= 0, got B=", batch, " N=", q_len, " H=", heads,
                 " D=", head_dim);
  batch_ = batch;
  q_len_ = q_len;
  heads_ = heads;
  head_dim_ = head_dim;
  const size_t rows = static_cast<size_t>(batch * heads * q_len);
  m_.assign(rows, kNegInf);
  l_.assign(rows, 0.0f);
  acc_.assign(rows * static_cast<size_t>(head_dim), 0.0f);
}

int default_num_threads() {
  if (const char* env = std::getenv("RINGATTN_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    RINGATTN_CHECK(end != env && *end == '\0' && n > 0 && n <= 4096,
                   "RINGATTN_NUM_THREADS must be a positive integer, got '", env, "'");
    return static_cast<int>(n);
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

int64_t fold_workspace_bytes(const AttentionSpec& spec, int64_t batch, int64_t heads,
                             int64_t head_dim, int64_t q_len, int64_t kv_len, DType dtype,
                             int num_threads) {
  if (batch == 0 || heads == 0 || q_len == 0 || kv_len == 0) return 0;
  const int threads = num_threads == 0 ? default_num_threads() : num_threads;
  const int64_t bh = batch * heads;
  const Tiles t = choose_tiles(spec, bh, q_len, threads);
  // Every thread that runs an item holds the buffers of a whole tile.
  const int64_t executors = std::min<int64_t>(threads, bh * t.q_tiles);
  return executors * scratch_floats(t, q_len, kv_len, head_dim, dtype != DType::kF32).total() *
         static_cast<int64_t>(sizeof(float));
}

FoldStats fold_block(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                     const TensorView& k, const TensorView& v, const int64_t* k_pos,
                     SoftmaxStateCpu& state, int num_threads) {
  Problem p;
  p.spec = spec;
  p.shape = check_attention_args(spec, q, k, v, nullptr, nullptr, nullptr);
  const AttentionShape& s = p.shape;
  RINGATTN_CHECK(q.device() == Device::kCPU, "the CPU kernel needs host tensors, got q on ",
                 device_name(q.device()));
  RINGATTN_CHECK(q_pos != nullptr || s.q_len == 0, "q_pos (the global query positions) is null");
  RINGATTN_CHECK(k_pos != nullptr || s.kv_len == 0, "k_pos (the global key positions) is null");
  RINGATTN_CHECK(state.batch() == s.batch && state.q_len() == s.q_len &&
                     state.heads() == s.heads && state.head_dim() == s.head_dim,
                 "softmax state must be sized for q ", q.describe(), ", got [B=", state.batch(),
                 ", N=", state.q_len(), ", H=", state.heads(), ", D=", state.head_dim(), "]");
  RINGATTN_CHECK(num_threads >= 0, "num_threads must be >= 0 (0 = default), got ", num_threads);
  const int64_t int_max = std::numeric_limits<int>::max();
  RINGATTN_CHECK(std::max({q.stride(1), k.stride(1), v.stride(1), s.heads * s.head_dim}) <= int_max,
                 "row strides exceed the BLAS int range");
  FoldStats total;
  if (s.batch == 0 || s.q_len == 0 || s.kv_len == 0) return total;

  p.scale = effective_scale(spec, s.head_dim);
  const int threads = num_threads == 0 ? default_num_threads() : num_threads;
  const int64_t bh = s.batch * s.heads;
  const Tiles tiles = choose_tiles(spec, bh, s.q_len, threads);
  p.tile_q = tiles.tile_q;
  p.tile_k = tiles.tile_k;
  p.q_tiles = tiles.q_tiles;
  make_key_tiles(spec, k_pos, s.kv_len, p.tile_k, p.k_begin, p.k_bounds);

  // Items ordered by query tile, last tile first: with contiguous causal positions those see
  // the most keys, and handing out the heavy items first balances the dynamic schedule.
  const int64_t items = bh * p.q_tiles;
  std::vector<FoldStats> item_stats(static_cast<size_t>(items));
  BlasSingleThreadScope blas_scope;
  ThreadPool::instance().parallel_for(items, threads, [&](int64_t item) {
    const int64_t qt = p.q_tiles - 1 - item / bh;
    const int64_t b = (item % bh) / s.heads;
    const int64_t h = item % s.heads;
    fold_item(p, q, q_pos, k, v, k_pos, b, h, qt, state,
              item_stats[static_cast<size_t>(item)]);
  });
  for (const FoldStats& st : item_stats) {
    total.tiles_computed += st.tiles_computed;
    total.tiles_skipped += st.tiles_skipped;
    total.flops += st.flops;
  }
  return total;
}

void finalize(const SoftmaxStateCpu& state, const TensorView* sink_logits, const TensorView& o,
              const TensorView* lse) {
  const int64_t bsz = state.batch(), n = state.q_len(), heads = state.heads(),
                d = state.head_dim();
  RINGATTN_CHECK(o.ndim() == 4 && o.size(0) == bsz && o.size(1) == n && o.size(2) == heads &&
                     o.size(3) == d,
                 "o must be [B, N, H, D] = [", bsz, ", ", n, ", ", heads, ", ", d, "], got ",
                 o.describe());
  RINGATTN_CHECK_CODE(ErrorCode::kUnsupported,
                      o.dtype() == DType::kF32 || o.dtype() == DType::kBF16 ||
                          o.dtype() == DType::kF16,
                      "o has unsupported dtype code ", static_cast<int>(o.dtype()),
                      ": expected f32, bf16 or f16");
  RINGATTN_CHECK(o.data() != nullptr || o.numel() == 0, "o has no data");
  RINGATTN_CHECK(o.device() == Device::kCPU, "o must be a host tensor");
  const bool has_lse = lse != nullptr && lse->data() != nullptr;
  if (has_lse) {
    RINGATTN_CHECK(lse->ndim() == 3 && lse->size(0) == bsz && lse->size(1) == heads &&
                       lse->size(2) == n && lse->dtype() == DType::kF32,
                   "lse must be [B, H, N] = [", bsz, ", ", heads, ", ", n, "] f32, got ",
                   lse->describe());
  }
  const bool has_sink = sink_logits != nullptr && sink_logits->data() != nullptr;
  if (has_sink) {
    RINGATTN_CHECK(sink_logits->ndim() == 1 && sink_logits->size(0) == heads &&
                       sink_logits->dtype() == DType::kF32,
                   "sink_logits must be [H] f32 with H=", heads, ", got ",
                   sink_logits->describe());
  }
  for (int64_t b = 0; b < bsz; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float z = has_sink ? sink_logits->data_as<const float>()[h * sink_logits->stride(0)]
                               : 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = (b * heads + h) * n + i;
        float row_lse = 0.0f;
        const float f = finalize_row(state.m()[row], state.l()[row], has_sink, z, &row_lse);
        if (has_lse) {
          lse->data_as<float>()[b * lse->stride(0) + h * lse->stride(1) + i * lse->stride(2)] =
              row_lse;
        }
        const float* a = state.acc() + ((b * n + i) * heads + h) * d;
        const int64_t off = b * o.stride(0) + i * o.stride(1) + h * o.stride(2);
        for (int64_t c = 0; c < d; ++c) {
          store_from_float(o.data(), o.dtype(), off + c * o.stride(3), a[c] * f);
        }
      }
    }
  }
}

FoldStats attention(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                    const TensorView& k, const TensorView& v, const int64_t* k_pos,
                    const TensorView* sink_logits, const TensorView& o, const TensorView* lse,
                    int num_threads) {
  const AttentionShape s = check_attention_args(spec, q, k, v, &o, lse, sink_logits);
  SoftmaxStateCpu state(s.batch, s.q_len, s.heads, s.head_dim);
  const FoldStats stats = fold_block(spec, q, q_pos, k, v, k_pos, state, num_threads);
  finalize(state, sink_logits, o, lse);
  return stats;
}

}  // namespace ringattn::cpu
