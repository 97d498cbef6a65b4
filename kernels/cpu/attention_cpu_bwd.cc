// The blockwise CPU backward. One work item is (batch, kv head, key tile): it owns the dk/dv
// rows of its key tile (no two threads ever write the same dk/dv row, so they accumulate in
// place with beta = 1), and walks the query tiles of every query head of its GQA group. For
// each visible (query tile, key tile) pair:
//   S  = scale Q K^T            (sgemm)     P  = exp(S - lse)   (masked -> 0, vectorised exp)
//   dP = dO V^T                 (sgemm)     dS = P (dP - Delta)
//   dV += P^T dO                (sgemm)     dK += scale dS^T Q  (sgemm)
//   dQ_tile = scale dS K        (sgemm into a thread buffer, added to dq under the tile's lock)
// Parallelising over key tiles instead of query tiles makes the two large accumulations (dk, dv)
// race-free and leaves only the dq addition (rows x D per pair, against 10 rows x keys x D FLOPs
// of products) to synchronise; items start at different query tiles so that two threads rarely
// want the same lock. The alternative, a second pass over query tiles for dq, would recompute S
// and dP: 7 products instead of 5.

#include "kernels/cpu/attention_cpu_bwd.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels/cpu/attention_tiles.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/cpu/vec_math.h"
#include "ringattn/memory.h"

namespace ringattn::cpu {
namespace {

using detail::Bounds;
using detail::bounds_of;
using detail::classify;
using detail::mask_row;
using detail::reserve_exact;
using detail::rows_as_f32;
using detail::TileKind;

// Tile sizes. A key tile is one work item (the M of dV and dK, the K of dQ); a query tile is the
// M of S, dP and dQ and the K of dV and dK. The two score-sized buffers (S/P and dP/dS) of
// 256 x 256 f32 take 512 KiB and stay in the 1 MiB L2 across the five products
// (docs/PERFORMANCE.md, "CPU backward kernel").
constexpr int64_t kTileQ = 256;
constexpr int64_t kTileK = 256;
// Key tiles shrink (down to kMinTileK) until there are at least two items per thread.
constexpr int64_t kMinTileK = 64;
// With a window both tiles shrink towards it, never below kMinTile.
constexpr int64_t kMinTile = 64;
// Rows per re-classified chunk of a partially masked tile.
constexpr int64_t kSubTileQ = 128;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Scratch {
  HostVector<float> s, dp, dq, q, dout, k, v;
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// The tiling of a fold of kv_len keys for bhk = batch x kv heads with `threads` threads: the one
// choice both fold_block_backward and backward_workspace_bytes use.
struct Tiles {
  int64_t tile_q = kTileQ, tile_k = kTileK;
};

Tiles choose_tiles(const AttentionSpec& spec, int64_t bhk, int64_t kv_len, int threads) {
  Tiles t;
  if (spec.window > 0) {
    // A key tile sees about tile + W queries (2W without causality): tiles near the window
    // keep the skipped fraction of each computed pair small.
    const int64_t w = std::clamp((spec.window + kMinTile - 1) / kMinTile * kMinTile, kMinTile,
                                 std::max(kTileQ, kTileK));
    t.tile_q = std::min(t.tile_q, w);
    t.tile_k = std::min(t.tile_k, w);
  }
  while (t.tile_k > kMinTileK && bhk * ((kv_len + t.tile_k - 1) / t.tile_k) < 2 * threads) {
    t.tile_k /= 2;
  }
  return t;
}

// Floats of each per-thread buffer (Scratch) for one fold: the two score-sized tiles and the dq
// tile always; f32 copies of q/dout rows and k/v key tiles when those inputs are converted.
struct ScratchFloats {
  int64_t s = 0, dp = 0, dq = 0, q = 0, dout = 0, k = 0, v = 0;
  int64_t total() const { return s + dp + dq + q + dout + k + v; }
};

ScratchFloats scratch_floats(const Tiles& t, int64_t q_len, int64_t kv_len, int64_t head_dim,
                             bool convert_q, bool convert_dout, bool convert_kv) {
  ScratchFloats f;
  f.s = f.dp = t.tile_q * t.tile_k;
  f.dq = t.tile_q * head_dim;
  if (convert_q) f.q = std::min(t.tile_q, q_len) * head_dim;
  if (convert_dout) f.dout = std::min(t.tile_q, q_len) * head_dim;
  if (convert_kv) f.k = f.v = std::min(t.tile_k, kv_len) * head_dim;
  return f;
}

struct Problem {
  AttentionSpec spec;
  AttentionShape shape;
  float scale = 1.0f;
  int64_t tile_q = kTileQ, tile_k = kTileK;
  int64_t q_tiles = 0;
  std::vector<Bounds> q_bounds;
  std::vector<int64_t> k_begin;
  std::vector<Bounds> k_bounds;
  const float* lse = nullptr;              // [B, H, Nq]
  const float* delta = nullptr;            // [B, H, Nq]
  float* dq = nullptr;                     // [B, Nq, H, D]
  std::unique_ptr<std::mutex[]> dq_locks;  // [B, H, q_tiles]
};

// One (query tile, key tile) pair, rows [r0, r1) of the query tile. Pointers are at row 0 of
// the query tile and key 0 of the key tile.
struct PairArgs {
  const float* qp;
  int64_t ldq;
  const float* dop;
  int64_t lddo;
  const float* kp;
  int64_t ldk;
  const float* vp;
  int64_t ldv;
  float* dk;
  float* dv;
  int64_t lddkv;
  const int64_t* q_pos;
  const int64_t* k_pos;
  int64_t keys;
  const float* lse;    // of row 0 of the query tile
  const float* delta;  // of row 0 of the query tile
  float* dq;           // row 0 of the query tile in the state's dq
  std::mutex* dq_lock;
};

void compute_rows(const Problem& p, const PairArgs& a, int64_t r0, int64_t r1, TileKind kind,
                  Scratch& scratch) {
  const int64_t d = p.shape.head_dim, keys = a.keys, rows = r1 - r0;
  const int m = static_cast<int>(rows), n = static_cast<int>(keys), dd = static_cast<int>(d);
  float* sc = scratch.s.data();
  float* dp = scratch.dp.data();
  const float* qp = a.qp + r0 * a.ldq;
  const float* dop = a.dop + r0 * a.lddo;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, dd, p.scale, qp,
              static_cast<int>(a.ldq), a.kp, static_cast<int>(a.ldk), 0.0f, sc, n);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, dd, 1.0f, dop,
              static_cast<int>(a.lddo), a.vp, static_cast<int>(a.ldv), 0.0f, dp, n);
  for (int64_t r = r0; r < r1; ++r) {
    float* srow = sc + (r - r0) * keys;
    float* dprow = dp + (r - r0) * keys;
    const float lse = a.lse[r];
    if (kind == TileKind::kPartial) mask_row(p.spec, a.q_pos[r], a.k_pos, srow, keys);
    // lse = -inf: the row saw no key and no learned sink, so its forward output and every
    // gradient through it are 0 (and exp(S - lse) would be NaN).
    if (lse == kNegInf) {
      std::memset(srow, 0, static_cast<size_t>(keys) * sizeof(float));
      std::memset(dprow, 0, static_cast<size_t>(keys) * sizeof(float));
      continue;
    }
    exp_shift_sum(srow, keys, lse);  // P, in place; masked logits become 0
    const float delta = a.delta[r];
    for (int64_t j = 0; j < keys; ++j) dprow[j] = srow[j] * (dprow[j] - delta);  // dS / scale
  }
  const int lddkv = static_cast<int>(a.lddkv);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, dd, m, 1.0f, sc, n, dop,
              static_cast<int>(a.lddo), 1.0f, a.dv, lddkv);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, dd, m, p.scale, dp, n, qp,
              static_cast<int>(a.ldq), 1.0f, a.dk, lddkv);
  float* tmp = scratch.dq.data();
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, dd, n, p.scale, dp, n, a.kp,
              static_cast<int>(a.ldk), 0.0f, tmp, dd);
  const int64_t ld_dq = p.shape.heads * d;
  std::lock_guard<std::mutex> lock(*a.dq_lock);
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = a.dq + (r0 + r) * ld_dq;
    const float* src = tmp + r * d;
    for (int64_t c = 0; c < d; ++c) dst[c] += src[c];
  }
}

void backward_item(const Problem& p, const TensorView& q, const int64_t* q_pos, const TensorView& k,
                   const TensorView& v, const int64_t* k_pos, const TensorView& dout,
                   const TensorView& dk, const TensorView& dv, int64_t b, int64_t hk, size_t kt,
                   FoldStats& stats) {
  const AttentionShape& s = p.shape;
  const int64_t d = s.head_dim;
  // Every buffer gets its whole capacity at once, so no growth pattern depends on which item a
  // thread runs first (backward_workspace_bytes counts this).
  Scratch& scratch = thread_scratch();
  const ScratchFloats sf =
      scratch_floats(Tiles{p.tile_q, p.tile_k}, s.q_len, s.kv_len, d, q.dtype() != DType::kF32,
                     dout.dtype() != DType::kF32, k.dtype() != DType::kF32);
  for (auto [buf, floats] : {std::pair<HostVector<float>*, int64_t>{&scratch.s, sf.s},
                             {&scratch.dp, sf.dp},
                             {&scratch.dq, sf.dq}}) {
    reserve_exact(*buf, floats);
    buf->resize(static_cast<size_t>(floats));
  }
  reserve_exact(scratch.q, sf.q);
  reserve_exact(scratch.dout, sf.dout);
  reserve_exact(scratch.k, sf.k);
  reserve_exact(scratch.v, sf.v);

  const int64_t k0 = p.k_begin[kt];
  PairArgs a{};
  a.keys = p.k_begin[kt + 1] - k0;
  a.k_pos = k_pos + k0;
  a.lddkv = dk.stride(1);
  a.dk = dk.data_as<float>() + b * dk.stride(0) + k0 * dk.stride(1) + hk * dk.stride(2);
  a.dv = dv.data_as<float>() + b * dv.stride(0) + k0 * dv.stride(1) + hk * dv.stride(2);
  bool have_kv = false;
  const int64_t group = s.group();
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i = 0; i < p.q_tiles; ++i) {
      // Start at a different query tile per key tile: concurrent items rarely share a dq lock.
      const int64_t qt = (i + static_cast<int64_t>(kt)) % p.q_tiles;
      const TileKind kind = classify(p.spec, p.q_bounds[qt], p.k_bounds[kt]);
      if (kind == TileKind::kSkip) {
        ++stats.tiles_skipped;
        continue;
      }
      if (!have_kv) {  // an item whose pairs are all skipped never converts k/v
        a.kp = rows_as_f32(k, b, k0, a.keys, hk, scratch.k, &a.ldk);
        a.vp = rows_as_f32(v, b, k0, a.keys, hk, scratch.v, &a.ldv);
        have_kv = true;
      }
      const int64_t q0 = qt * p.tile_q;
      const int64_t rows = std::min(p.tile_q, s.q_len - q0);
      a.qp = rows_as_f32(q, b, q0, rows, h, scratch.q, &a.ldq);
      a.dop = rows_as_f32(dout, b, q0, rows, h, scratch.dout, &a.lddo);
      a.q_pos = q_pos + q0;
      a.lse = p.lse + (b * s.heads + h) * s.q_len + q0;
      a.delta = p.delta + (b * s.heads + h) * s.q_len + q0;
      a.dq = p.dq + ((b * s.q_len + q0) * s.heads + h) * d;
      a.dq_lock = &p.dq_locks[static_cast<size_t>((b * s.heads + h) * p.q_tiles + qt)];
      int64_t computed_rows = 0;
      if (kind == TileKind::kFull) {
        compute_rows(p, a, 0, rows, kind, scratch);
        computed_rows = rows;
      } else {
        // The causal diagonal or a window edge: re-classify chunks so that the masked part of
        // a large tile is mostly skipped rather than computed and thrown away.
        for (int64_t r0 = 0; r0 < rows; r0 += kSubTileQ) {
          const int64_t r1 = std::min(rows, r0 + kSubTileQ);
          const TileKind sub = classify(p.spec, bounds_of(q_pos, q0 + r0, q0 + r1), p.k_bounds[kt]);
          if (sub == TileKind::kSkip) continue;
          compute_rows(p, a, r0, r1, sub, scratch);
          computed_rows += r1 - r0;
        }
      }
      ++stats.tiles_computed;
      stats.flops += 10.0 * static_cast<double>(computed_rows) * static_cast<double>(a.keys) *
                     static_cast<double>(d);
    }
  }
}

void check_accumulator(const TensorView& t, const char* name, const AttentionShape& s) {
  RINGATTN_CHECK(t.ndim() == 4 && t.size(0) == s.batch && t.size(1) == s.kv_len &&
                     t.size(2) == s.kv_heads && t.size(3) == s.head_dim,
                 name, " must be [B, Nk, H_kv, D] = [", s.batch, ", ", s.kv_len, ", ", s.kv_heads,
                 ", ", s.head_dim, "], got ", t.describe());
  RINGATTN_CHECK(t.dtype() == DType::kF32, name, " accumulator must be f32, got ",
                 dtype_name(t.dtype()));
  RINGATTN_CHECK(t.device() == Device::kCPU, name, " must be a host tensor");
  RINGATTN_CHECK(t.numel() == 0 || (t.data() != nullptr && t.stride(3) == 1 &&
                                    t.stride(1) >= s.head_dim && t.stride(2) >= s.head_dim),
                 name,
                 " needs data, a contiguous innermost dimension and rows that do not "
                 "overlap, got ",
                 t.describe());
}

void check_like(const TensorView& t, const char* name, const TensorView& like,
                const char* like_name) {
  RINGATTN_CHECK(t.ndim() == like.ndim(), name, " must have the shape of ", like_name, " ",
                 like.describe(), ", got ", t.describe());
  for (int i = 0; i < t.ndim(); ++i) {
    RINGATTN_CHECK(t.size(i) == like.size(i), name, " must have the shape of ", like_name, " ",
                   like.describe(), ", got ", t.describe());
  }
  RINGATTN_CHECK_CODE(
      ErrorCode::kUnsupported,
      t.dtype() == DType::kF32 || t.dtype() == DType::kBF16 || t.dtype() == DType::kF16, name,
      " has unsupported dtype code ", static_cast<int>(t.dtype()), ": expected f32, bf16 or f16");
  RINGATTN_CHECK(t.device() == Device::kCPU, name, " must be a host tensor");
  RINGATTN_CHECK(t.data() != nullptr || t.numel() == 0, name, " has no data");
  RINGATTN_CHECK(t.numel() == 0 || t.stride(t.ndim() - 1) == 1, name,
                 " needs a contiguous innermost dimension, got ", t.describe());
}

}  // namespace

void BackwardStateCpu::begin(const TensorView& o, const TensorView& dout, const TensorView& lse) {
  RINGATTN_CHECK(o.ndim() == 4, "o must be [B, N, H, D], got ", o.describe());
  check_like(o, "o", o, "o");
  check_like(dout, "dout", o, "o");
  batch_ = o.size(0);
  q_len_ = o.size(1);
  heads_ = o.size(2);
  head_dim_ = o.size(3);
  RINGATTN_CHECK(lse.ndim() == 3 && lse.size(0) == batch_ && lse.size(1) == heads_ &&
                     lse.size(2) == q_len_ && lse.dtype() == DType::kF32 &&
                     lse.device() == Device::kCPU && (lse.data() != nullptr || lse.numel() == 0),
                 "lse must be [B, H, N] = [", batch_, ", ", heads_, ", ", q_len_,
                 "] f32 on the host, got ", lse.describe());
  const size_t rows = static_cast<size_t>(batch_ * heads_ * q_len_);
  lse_.resize(rows);
  delta_.resize(rows);
  dq_.assign(rows * static_cast<size_t>(head_dim_), 0.0f);
  for (int64_t b = 0; b < batch_; ++b) {
    for (int64_t h = 0; h < heads_; ++h) {
      for (int64_t i = 0; i < q_len_; ++i) {
        const size_t row = static_cast<size_t>((b * heads_ + h) * q_len_ + i);
        lse_[row] =
            lse.data_as<const float>()[b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2)];
        const int64_t oo = b * o.stride(0) + i * o.stride(1) + h * o.stride(2);
        const int64_t od = b * dout.stride(0) + i * dout.stride(1) + h * dout.stride(2);
        double sum = 0.0;
        for (int64_t c = 0; c < head_dim_; ++c) {
          sum += static_cast<double>(load_as_float(o.data(), o.dtype(), oo + c)) *
                 static_cast<double>(load_as_float(dout.data(), dout.dtype(), od + c));
        }
        delta_[row] = static_cast<float>(sum);
      }
    }
  }
}

FoldStats fold_block_backward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                              const TensorView& k, const TensorView& v, const int64_t* k_pos,
                              const TensorView& dout, BackwardStateCpu& state, const TensorView& dk,
                              const TensorView& dv, int num_threads) {
  Problem p;
  p.spec = spec;
  p.shape = check_attention_args(spec, q, k, v, nullptr, nullptr, nullptr);
  const AttentionShape& s = p.shape;
  RINGATTN_CHECK(q.device() == Device::kCPU, "the CPU kernel needs host tensors, got q on ",
                 device_name(q.device()));
  check_like(dout, "dout", q, "q");
  check_accumulator(dk, "dk", s);
  check_accumulator(dv, "dv", s);
  RINGATTN_CHECK(q_pos != nullptr || s.q_len == 0, "q_pos (the global query positions) is null");
  RINGATTN_CHECK(k_pos != nullptr || s.kv_len == 0, "k_pos (the global key positions) is null");
  RINGATTN_CHECK(state.batch() == s.batch && state.q_len() == s.q_len && state.heads() == s.heads &&
                     state.head_dim() == s.head_dim,
                 "backward state must be sized for q ", q.describe(), ", got [B=", state.batch(),
                 ", N=", state.q_len(), ", H=", state.heads(), ", D=", state.head_dim(), "]");
  RINGATTN_CHECK(num_threads >= 0, "num_threads must be >= 0 (0 = default), got ", num_threads);
  const int64_t int_max = std::numeric_limits<int>::max();
  RINGATTN_CHECK(std::max({q.stride(1), k.stride(1), v.stride(1), dout.stride(1), dk.stride(1),
                           dv.stride(1), s.heads * s.head_dim}) <= int_max,
                 "row strides exceed the BLAS int range");
  FoldStats total;
  if (s.batch == 0 || s.q_len == 0 || s.kv_len == 0) return total;

  p.scale = effective_scale(spec, s.head_dim);
  p.lse = state.lse();
  p.delta = state.delta();
  p.dq = state.dq();
  const int threads = num_threads == 0 ? default_num_threads() : num_threads;
  const int64_t bhk = s.batch * s.kv_heads;
  const Tiles tiles = choose_tiles(spec, bhk, s.kv_len, threads);
  p.tile_q = tiles.tile_q;
  p.tile_k = tiles.tile_k;
  p.q_tiles = (s.q_len + p.tile_q - 1) / p.tile_q;
  for (int64_t qt = 0; qt < p.q_tiles; ++qt) {
    p.q_bounds.push_back(bounds_of(q_pos, qt * p.tile_q, std::min(s.q_len, (qt + 1) * p.tile_q)));
  }
  detail::make_key_tiles(spec, k_pos, s.kv_len, p.tile_k, p.k_begin, p.k_bounds);
  p.dq_locks.reset(new std::mutex[static_cast<size_t>(s.batch * s.heads * p.q_tiles)]);

  const int64_t k_tiles = static_cast<int64_t>(p.k_bounds.size());
  const int64_t items = bhk * k_tiles;
  std::vector<FoldStats> item_stats(static_cast<size_t>(items));
  BlasSingleThreadScope blas_scope;
  ThreadPool::instance().parallel_for(items, threads, [&](int64_t item) {
    const size_t kt = static_cast<size_t>(item / bhk);
    const int64_t b = (item % bhk) / s.kv_heads;
    const int64_t hk = item % s.kv_heads;
    backward_item(p, q, q_pos, k, v, k_pos, dout, dk, dv, b, hk, kt,
                  item_stats[static_cast<size_t>(item)]);
  });
  for (const FoldStats& st : item_stats) {
    total.tiles_computed += st.tiles_computed;
    total.tiles_skipped += st.tiles_skipped;
    total.flops += st.flops;
  }
  return total;
}

int64_t backward_workspace_bytes(const AttentionSpec& spec, int64_t batch, int64_t kv_heads,
                                 int64_t head_dim, int64_t q_len, int64_t kv_len, DType dtype,
                                 int num_threads) {
  if (batch == 0 || kv_heads == 0 || q_len == 0 || kv_len == 0) return 0;
  const int threads = num_threads == 0 ? default_num_threads() : num_threads;
  const int64_t bhk = batch * kv_heads;
  const Tiles t = choose_tiles(spec, bhk, kv_len, threads);
  // Every thread that runs an item holds the buffers of a whole tile pair. Keys that are all
  // sinks or all ordinary (every fold of the ring) are cut into regular tiles.
  const int64_t items = bhk * ((kv_len + t.tile_k - 1) / t.tile_k);
  const bool convert = dtype != DType::kF32;
  const int64_t executors = std::min<int64_t>(threads, items);
  return executors * scratch_floats(t, q_len, kv_len, head_dim, convert, convert, convert).total() *
         static_cast<int64_t>(sizeof(float));
}

void sink_logits_backward(const BackwardStateCpu& state, const TensorView& sink_logits,
                          float* dsink) {
  const int64_t heads = state.heads();
  RINGATTN_CHECK(sink_logits.ndim() == 1 && sink_logits.size(0) == heads &&
                     sink_logits.dtype() == DType::kF32 && sink_logits.data() != nullptr,
                 "sink_logits must be [H] f32 with H=", heads, ", got ", sink_logits.describe());
  RINGATTN_CHECK(dsink != nullptr, "dsink is null");
  for (int64_t h = 0; h < heads; ++h) {
    const float z = sink_logits.data_as<const float>()[h * sink_logits.stride(0)];
    double sum = 0.0;
    for (int64_t b = 0; b < state.batch(); ++b) {
      const size_t row0 = static_cast<size_t>((b * heads + h) * state.q_len());
      for (int64_t i = 0; i < state.q_len(); ++i) {
        // With a learned sink every lse is finite (lse >= z), so exp(z - lse) <= 1.
        sum += std::exp(static_cast<double>(z) - state.lse()[row0 + i]) * state.delta()[row0 + i];
      }
    }
    dsink[h] -= static_cast<float>(sum);
  }
}

void finalize_backward(const BackwardStateCpu& state, const TensorView& dq) {
  const int64_t bsz = state.batch(), n = state.q_len(), heads = state.heads(), d = state.head_dim();
  RINGATTN_CHECK(dq.ndim() == 4 && dq.size(0) == bsz && dq.size(1) == n && dq.size(2) == heads &&
                     dq.size(3) == d,
                 "dq must be [B, N, H, D] = [", bsz, ", ", n, ", ", heads, ", ", d, "], got ",
                 dq.describe());
  check_like(dq, "dq", dq, "dq");
  for (int64_t b = 0; b < bsz; ++b) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* a = state.dq() + ((b * n + i) * heads + h) * d;
        const int64_t off = b * dq.stride(0) + i * dq.stride(1) + h * dq.stride(2);
        for (int64_t c = 0; c < d; ++c) store_from_float(dq.data(), dq.dtype(), off + c, a[c]);
      }
    }
  }
}

FoldStats attention_backward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                             const TensorView& k, const TensorView& v, const int64_t* k_pos,
                             const TensorView* sink_logits, const TensorView& o,
                             const TensorView& lse, const TensorView& dout, const TensorView& dq,
                             const TensorView& dk, const TensorView& dv, const TensorView* dsink,
                             int num_threads) {
  const AttentionShape s = check_attention_args(spec, q, k, v, &o, &lse, sink_logits);
  check_like(dk, "dk", k, "k");
  check_like(dv, "dv", v, "v");
  const bool has_sink = sink_logits != nullptr && sink_logits->data() != nullptr;
  const bool want_dsink = dsink != nullptr && dsink->data() != nullptr;
  if (want_dsink) {
    RINGATTN_CHECK(dsink->ndim() == 1 && dsink->size(0) == s.heads &&
                       dsink->dtype() == DType::kF32 && dsink->stride(0) == 1,
                   "dsink must be [H] f32 contiguous with H=", s.heads, ", got ",
                   dsink->describe());
  }
  BackwardStateCpu state;
  state.begin(o, dout, lse);
  const size_t kv_elems = static_cast<size_t>(s.batch * s.kv_len * s.kv_heads * s.head_dim);
  HostVector<float> dk_acc(kv_elems, 0.0f), dv_acc(kv_elems, 0.0f);
  const TensorView dk_view(dk_acc.data(), DType::kF32, {s.batch, s.kv_len, s.kv_heads, s.head_dim});
  const TensorView dv_view(dv_acc.data(), DType::kF32, {s.batch, s.kv_len, s.kv_heads, s.head_dim});
  const FoldStats stats =
      fold_block_backward(spec, q, q_pos, k, v, k_pos, dout, state, dk_view, dv_view, num_threads);
  finalize_backward(state, dq);
  for (auto [acc, out] :
       {std::pair<const HostVector<float>*, const TensorView*>{&dk_acc, &dk}, {&dv_acc, &dv}}) {
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t j = 0; j < s.kv_len; ++j) {
        for (int64_t h = 0; h < s.kv_heads; ++h) {
          const float* a = acc->data() + ((b * s.kv_len + j) * s.kv_heads + h) * s.head_dim;
          const int64_t off = b * out->stride(0) + j * out->stride(1) + h * out->stride(2);
          for (int64_t c = 0; c < s.head_dim; ++c) {
            store_from_float(out->data(), out->dtype(), off + c, a[c]);
          }
        }
      }
    }
  }
  if (want_dsink) {
    float* ds = dsink->data_as<float>();
    std::fill(ds, ds + s.heads, 0.0f);
    if (has_sink) sink_logits_backward(state, *sink_logits, ds);
  }
  return stats;
}

}  // namespace ringattn::cpu
