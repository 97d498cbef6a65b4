// The CUDA backward: the block fold of kernels/cpu/attention_cpu_bwd.cc on a GPU, plus the small
// f32 utilities of the backward (delta, dsink, dq store, accumulator add).
//
// Both fold kernels give a CTA one key tile of one (batch, kv head): it owns the dk/dv rows of
// its keys, so dk and dv accumulate in registers over every query tile and every query head of
// the GQA group and are added to memory once at the end, without atomics. dq rows are shared by
// every key tile, so each (query tile, head) step adds its dq tile with f32 atomicAdd into the
// state's accumulator. Per step, with P = exp(scale * Q K^T - lse) (masked -> 0):
//   dP = dO V^T,  dS = P * (dP - Delta),  dV += P^T dO,  dK += dS^T Q,  dQ += dS K
// (the scale of dK and dQ is applied once, at the end of the sums). Query tiles are visited in
// an order rotated by the key tile's index, so that CTAs of one (batch, kv head) rarely add to
// the same dq rows at once; tiles whose position box is fully masked are never loaded (a warp
// finds the next live query tile by testing 32 tile bounds at once).
//
// Tensor-core kernel (bf16/f16, D = 64 or 128), FlashAttention-2 style: 8 warps, 64 keys per CTA,
// 64 query rows per step. K/V tiles stay in shared memory; Q/dO tiles are double buffered with
// cp.async (the next live step loads while the current one computes). S and dP run on mma.sync
// m16n8k16 with f32 accumulators, warp w owning rows 16*(w%4) and keys 32*(w/4) of the 64x64
// tile; P and dS are rounded to the input dtype and staged through shared memory, where the
// transposed products read them back with ldmatrix.trans: warp w owns keys (dV, dK) or query
// rows (dQ) 16*(w%4) and head-dim columns D/2*(w/4). Rows are padded by 16 bytes so that the 8
// row addresses of every ldmatrix fall in distinct bank groups. cp.async needs 16-byte aligned
// rows: other strides take the generic kernel.
//
// Generic kernel (f32, bf16, f16, any D <= 256): the same decomposition with tiles of 32 (16 for
// D > 128) keys and queries converted to f32 in shared memory and f32 FMA products, each thread
// owning fixed (row, column) elements of every product.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/cuda_check.h"

namespace ringattn::cuda {
namespace {

using detail::cp_async16;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::Elem;
using detail::fast_exp2;
using detail::kLog2e;
using detail::ldmatrix_x4;
using detail::ldmatrix_x4_trans;
using detail::mma16816;
using detail::pack2;

constexpr int kThreads = 256;  // both fold kernels: 8 warps

// Everything a backward fold needs on the device. Strides in elements.
struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const int64_t* q_pos;
  const int64_t* k_pos;
  const int64_t* q_bounds;  // [q_tiles][2] (lo, hi) of the kernel's query tiles
  const int64_t* k_bounds;  // [k_tiles][2] of its key tiles
  const float* lse;         // [B, H, Nq]
  const float* delta;       // [B, H, Nq]
  float* dq;                // [B, Nq, H, D] contiguous
  float* dk;                // [B, Nk, H_kv, D] strided
  float* dv;
  int64_t qs_b, qs_n, qs_h;
  int64_t ks_b, ks_n, ks_h;
  int64_t vs_b, vs_n, vs_h;
  int64_t ds_b, ds_n, ds_h;  // dout
  int64_t dks_b, dks_n, dks_h;
  int64_t dvs_b, dvs_n, dvs_h;
  int64_t q_len, k_len, q_tiles, k_tiles;
  int heads, kv_heads, group, head_dim;
  float scale;       // dK and dQ factor
  float scale_log2;  // scale * log2(e): P = exp2(s * scale_log2 - lse * log2(e))
  bool causal;
  int64_t window, sinks;
};

// The first iteration index i in [i_begin, q_tiles) whose query tile (i + rot) % q_tiles is not
// fully masked for the key box [k_lo, k_hi], or q_tiles when none. The 32 lanes of the warp test
// 32 tiles at once and agree through a ballot: every lane of the warp must call it, and every
// warp of the CTA gets the same answer.
__device__ __forceinline__ int64_t next_live_q_tile(const BwdParams& p, int64_t i_begin,
                                                    int64_t rot, int64_t k_lo, int64_t k_hi) {
  const int lane = threadIdx.x & 31;
  for (int64_t base = i_begin; base < p.q_tiles; base += 32) {
    const int64_t i = base + lane;
    bool live = false;
    if (i < p.q_tiles) {
      int64_t qt = i + rot;  // rot < q_tiles, so one subtraction wraps it
      if (qt >= p.q_tiles) qt -= p.q_tiles;
      live = classify_tile(p.causal, p.window, p.sinks, p.q_bounds[2 * qt], p.q_bounds[2 * qt + 1],
                           k_lo, k_hi) != TileKind::kSkip;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, live);
    if (ballot != 0u) return base + (__ffs(ballot) - 1);
  }
  return p.q_tiles;
}

// The key tile a CTA owns. blockIdx.x = (b * H_kv + hk) * k_tiles + kt: consecutive CTAs share
// (b, hk) and read the same Q/dO from L2. Query tiles are visited from tile rot = kt % q_tiles
// on, so the CTAs of one head do not all add into the same dq rows at once.
struct KeyTile {
  int64_t kt, b, k0, k_lo, k_hi, rot;
  int hk, k_rows;
};
__device__ __forceinline__ KeyTile key_tile_of_cta(const BwdParams& p, int tile) {
  KeyTile t;
  t.kt = blockIdx.x % p.k_tiles;
  const int64_t bhk = blockIdx.x / p.k_tiles;
  t.b = bhk / p.kv_heads;
  t.hk = static_cast<int>(bhk % p.kv_heads);
  t.k0 = t.kt * tile;
  t.k_rows = static_cast<int>(p.k_len - t.k0 < tile ? p.k_len - t.k0 : tile);
  t.k_lo = p.k_bounds[2 * t.kt];
  t.k_hi = p.k_bounds[2 * t.kt + 1];
  t.rot = t.kt % p.q_tiles;
  return t;
}

__device__ __forceinline__ int64_t rotated_tile(int64_t i, int64_t rot, int64_t tiles) {
  const int64_t t = i + rot;
  return t >= tiles ? t - tiles : t;
}

__device__ __forceinline__ TileKind tile_kind(const BwdParams& p, int64_t qt, int64_t k_lo,
                                              int64_t k_hi) {
  return classify_tile(p.causal, p.window, p.sinks, p.q_bounds[2 * qt], p.q_bounds[2 * qt + 1],
                       k_lo, k_hi);
}

// ---- tensor-core kernel ----------------------------------------------------------------------

template <int D>
struct TcShape {
  static constexpr int kBM = 64;           // query rows per step
  static constexpr int kBN = 64;           // keys per CTA
  static constexpr int kPitch = D + 8;     // K, V, Q, dO rows (elements): +16 bytes per row
  static constexpr int kPitchP = kBN + 8;  // P, dS rows
  static constexpr int kNd = D / 16;       // n-tiles of 8 columns per warp in the D-wide products
  // Byte offsets in dynamic shared memory (every one a multiple of 16).
  static constexpr size_t kKposOff = 0;                              // int64 [kBN]
  static constexpr size_t kKOff = kKposOff + kBN * sizeof(int64_t);  // T [kBN][kPitch]
  static constexpr size_t kVOff = kKOff + kBN * kPitch * 2;          // T [kBN][kPitch]
  static constexpr size_t kQOff = kVOff + kBN * kPitch * 2;          // T [2][kBM][kPitch]
  static constexpr size_t kDoOff = kQOff + 2 * kBM * kPitch * 2;     // T [2][kBM][kPitch]
  static constexpr size_t kPOff = kDoOff + 2 * kBM * kPitch * 2;     // T [kBM][kPitchP]
  static constexpr size_t kDsOff = kPOff + kBM * kPitchP * 2;        // T [kBM][kPitchP]
  static constexpr size_t kSmemBytes = kDsOff + kBM * kPitchP * 2;
  static_assert(kKOff % 16 == 0 && kVOff % 16 == 0 && kQOff % 16 == 0 && kDoOff % 16 == 0 &&
                    kPOff % 16 == 0 && kDsOff % 16 == 0,
                "cp.async and ldmatrix need 16-byte aligned rows");
  static_assert(kBM == 64 && kBN == 64, "the warp layout below assumes 64 x 64 tiles");
};

// D = 128 keeps 64 f32 accumulators (dK, dV) per thread across the whole CTA: one CTA per SM's
// register share; D = 64 fits two.
template <int D>
constexpr int tc_min_blocks() {
  return D == 64 ? 2 : 1;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, tc_min_blocks<D>()) bwd_tc_kernel(const BwdParams p) {
  using S = TcShape<D>;
  constexpr int kBM = S::kBM, kBN = S::kBN, kPitch = S::kPitch, kPitchP = S::kPitchP;
  constexpr int kNd = S::kNd;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char bwd_smem[];
  int64_t* kpos_s = reinterpret_cast<int64_t*>(bwd_smem + S::kKposOff);
  T* k_s = reinterpret_cast<T*>(bwd_smem + S::kKOff);
  T* v_s = reinterpret_cast<T*>(bwd_smem + S::kVOff);
  T* q_s = reinterpret_cast<T*>(bwd_smem + S::kQOff);    // two buffers of kBM * kPitch
  T* do_s = reinterpret_cast<T*>(bwd_smem + S::kDoOff);  // two buffers
  T* p_s = reinterpret_cast<T*>(bwd_smem + S::kPOff);
  T* ds_s = reinterpret_cast<T*>(bwd_smem + S::kDsOff);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const KeyTile kt_ = key_tile_of_cta(p, kBN);
  const int64_t b = kt_.b, k0 = kt_.k0, k_lo = kt_.k_lo, k_hi = kt_.k_hi, rot = kt_.rot;
  const int hk = kt_.hk, k_rows = kt_.k_rows;

  // A CTA whose keys no query sees leaves dk/dv untouched.
  int64_t it = next_live_q_tile(p, 0, rot, k_lo, k_hi);
  if (it >= p.q_tiles) return;

  const T* k_base = static_cast<const T*>(p.k) + b * p.ks_b + hk * p.ks_h;
  const T* v_base = static_cast<const T*>(p.v) + b * p.vs_b + hk * p.vs_h;
  for (int c = tid; c < kBN * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < k_rows;
    // Keys past the end are zeros, never garbage: P is 0 there, but 0 * NaN would be NaN.
    cp_async16(k_s + r * kPitch + col, ok ? k_base + (k0 + r) * p.ks_n + col : k_base, ok ? 16 : 0);
    cp_async16(v_s + r * kPitch + col, ok ? v_base + (k0 + r) * p.vs_n + col : v_base, ok ? 16 : 0);
  }
  if (tid < kBN) kpos_s[tid] = tid < k_rows ? p.k_pos[k0 + tid] : 0;

  // Q and dO rows of query tile qt, head h, into buffer buf (rows past the end: zeros).
  auto load_q_do = [&](int64_t qt, int h, int buf) {
    const int64_t q0 = qt * kBM;
    const T* q_base = static_cast<const T*>(p.q) + b * p.qs_b + h * p.qs_h;
    const T* d_base = static_cast<const T*>(p.dout) + b * p.ds_b + h * p.ds_h;
    T* qs = q_s + buf * (kBM * kPitch);
    T* ds = do_s + buf * (kBM * kPitch);
    for (int c = tid; c < kBM * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const int64_t n = q0 + r;
      const bool ok = n < p.q_len;
      cp_async16(qs + r * kPitch + col, ok ? q_base + n * p.qs_n + col : q_base, ok ? 16 : 0);
      cp_async16(ds + r * kPitch + col, ok ? d_base + n * p.ds_n + col : d_base, ok ? 16 : 0);
    }
  };

  int64_t qt = rotated_tile(it, rot, p.q_tiles);
  TileKind kind = tile_kind(p, qt, k_lo, k_hi);
  int hh = 0;  // head within the group
  load_q_do(qt, hk * p.group, 0);
  cp_async_commit();  // one group: K, V and the first Q/dO

  // This warp's slices. Products over (query rows x keys) (S, dP): rows 16*wm, keys 32*wn.
  // Products over (keys x D) (dV, dK): keys 16*wm, columns D/2*wn; over (rows x D) (dQ): rows
  // 16*wm, columns D/2*wn.
  const int wm = warp % 4, wn = warp / 4;
  float dk_acc[kNd][4], dv_acc[kNd][4];
#pragma unroll
  for (int n = 0; n < kNd; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.0f;
  }

  int buf = 0;
  while (true) {
    // The step after this one: the next head of the group, else the next live query tile.
    int64_t next_it = it;
    int next_hh = hh + 1;
    if (next_hh == p.group) {
      next_hh = 0;
      next_it = next_live_q_tile(p, it + 1, rot, k_lo, k_hi);
    }
    cp_async_wait<0>();
    // Everyone's copies of this step have landed, and everyone is done with the previous step
    // (its Q/dO buffer, which the prefetch below overwrites, and P/dS).
    __syncthreads();
    const int64_t next_qt = next_it < p.q_tiles ? rotated_tile(next_it, rot, p.q_tiles) : 0;
    if (next_it < p.q_tiles) {
      load_q_do(next_qt, hk * p.group + next_hh, buf ^ 1);
      cp_async_commit();
    }

    const int h = hk * p.group + hh;
    const int64_t q0 = qt * kBM;
    const int q_rows = static_cast<int>(p.q_len - q0 < kBM ? p.q_len - q0 : kBM);
    const T* qs = q_s + buf * (kBM * kPitch);
    const T* dos = do_s + buf * (kBM * kPitch);

    // ---- S = Q K^T and dP = dO V^T: rows 16*wm.., keys 32*wn.. (4 n-tiles) ----
    {
      float s[4][4], dp[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        // A (16 rows x 16 head-dim columns, row-major): lane l addresses row l % 16, column
        // block l / 16.
        uint32_t aq[4], ado[4];
        const int a_off = (wm * 16 + lane % 16) * kPitch + kk * 16 + (lane / 16) * 8;
        ldmatrix_x4(aq, qs + a_off);
        ldmatrix_x4(ado, dos + a_off);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          // B = K^T (k = head dim, n = key) from K stored [key][dim]: matrices (keys 0-7, dims
          // 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), (keys 8-15, dims 8-15) = b0, b1
          // of n-tile 2np and b0, b1 of n-tile 2np+1.
          const int b_off = (wn * 32 + np * 16 + lane % 8 + (lane / 16) * 8) * kPitch + kk * 16 +
                            ((lane / 8) % 2) * 8;
          uint32_t bk[4], bv[4];
          ldmatrix_x4(bk, k_s + b_off);
          ldmatrix_x4(bv, v_s + b_off);
          mma16816<T>(s[2 * np], aq, bk[0], bk[1]);
          mma16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
          mma16816<T>(dp[2 * np], ado, bv[0], bv[1]);
          mma16816<T>(dp[2 * np + 1], ado, bv[2], bv[3]);
        }
      }
      // P and dS of this thread's elements: rows r = 16*wm + g + 8*half, keys j = 32*wn + 8*n +
      // 2*tq + {0, 1} (accumulator element 2*half + {0, 1}).
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wm * 16 + g + 8 * half;
        const bool row_ok = r < q_rows;
        float lse2 = 0.0f, delta = 0.0f;
        int64_t qpos = 0;
        bool row_live = false;
        if (row_ok) {
          const int64_t si = (b * p.heads + h) * p.q_len + q0 + r;
          const float lse = p.lse[si];
          // lse = -inf: the row saw no key and no learned sink; every gradient through it is 0
          // (and exp(s - lse) would be +inf).
          row_live = lse != -INFINITY;
          lse2 = lse * kLog2e;
          delta = p.delta[si];
          if (kind == TileKind::kPartial) qpos = p.q_pos[q0 + r];
        }
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          float pv[2], dsv[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = wn * 32 + n * 8 + 2 * tq + e;
            bool vis = row_live && j < k_rows;
            if (vis && kind == TileKind::kPartial) {
              vis = visible(p.causal, p.window, p.sinks, qpos, kpos_s[j]);
            }
            const float sv = s[n][2 * half + e], dpv = dp[n][2 * half + e];
            pv[e] = vis ? fast_exp2(sv * p.scale_log2 - lse2) : 0.0f;
            dsv[e] = vis ? pv[e] * (dpv - delta) : 0.0f;
          }
          const int off = r * kPitchP + wn * 32 + n * 8 + 2 * tq;
          *reinterpret_cast<uint32_t*>(p_s + off) = pack2<T>(pv[0], pv[1]);
          *reinterpret_cast<uint32_t*>(ds_s + off) = pack2<T>(dsv[0], dsv[1]);
        }
      }
    }
    __syncthreads();  // P and dS complete

    // ---- dV += P^T dO and dK += dS^T Q: keys 16*wm.., columns D/2*wn.. (kNd n-tiles) ----
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      // A = P^T (m = key, k = query row) from P stored [row][key], transposed: matrices (rows
      // 0-7, keys 0-7) -> a0, (rows 0-7, keys 8-15) -> a1, (rows 8-15, keys 0-7) -> a2,
      // (rows 8-15, keys 8-15) -> a3.
      const int a_off =
          (kk * 16 + lane % 8 + (lane / 16) * 8) * kPitchP + wm * 16 + ((lane / 8) % 2) * 8;
      uint32_t ap[4], ads[4];
      ldmatrix_x4_trans(ap, p_s + a_off);
      ldmatrix_x4_trans(ads, ds_s + a_off);
#pragma unroll
      for (int np = 0; np < kNd / 2; ++np) {
        // B = dO (k = query row, n = dim) stored [row][dim], transposed: matrices (rows 0-7,
        // dims 0-7) -> b0 and (rows 8-15, dims 0-7) -> b1 of n-tile 2np, then dims 8-15 for
        // n-tile 2np+1.
        const int b_off = (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kPitch + wn * (D / 2) +
                          np * 16 + (lane / 16) * 8;
        uint32_t bdo[4], bq[4];
        ldmatrix_x4_trans(bdo, dos + b_off);
        ldmatrix_x4_trans(bq, qs + b_off);
        mma16816<T>(dv_acc[2 * np], ap, bdo[0], bdo[1]);
        mma16816<T>(dv_acc[2 * np + 1], ap, bdo[2], bdo[3]);
        mma16816<T>(dk_acc[2 * np], ads, bq[0], bq[1]);
        mma16816<T>(dk_acc[2 * np + 1], ads, bq[2], bq[3]);
      }
    }

    // ---- dQ += scale * dS K: rows 16*wm.., columns D/2*wn.. ----
    {
      float dq[kNd][4];
#pragma unroll
      for (int n = 0; n < kNd; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[n][e] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[4];  // dS (m = query row, k = key), row-major
        ldmatrix_x4(a, ds_s + (wm * 16 + lane % 16) * kPitchP + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < kNd / 2; ++np) {
          // B = K (k = key, n = dim) stored [key][dim], transposed (as dO above).
          const int b_off = (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kPitch + wn * (D / 2) +
                            np * 16 + (lane / 16) * 8;
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, k_s + b_off);
          mma16816<T>(dq[2 * np], a, bk[0], bk[1]);
          mma16816<T>(dq[2 * np + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = wm * 16 + g + 8 * half;
        if (r >= q_rows) continue;
        float* dst = p.dq + ((b * p.q_len + q0 + r) * p.heads + h) * static_cast<int64_t>(D) +
                     wn * (D / 2) + 2 * tq;
#pragma unroll
        for (int n = 0; n < kNd; ++n) {
          atomicAdd(dst + n * 8, p.scale * dq[n][2 * half]);
          atomicAdd(dst + n * 8 + 1, p.scale * dq[n][2 * half + 1]);
        }
      }
    }

    if (next_it >= p.q_tiles) break;
    if (next_it != it) kind = tile_kind(p, next_qt, k_lo, k_hi);
    it = next_it;
    qt = next_qt;
    hh = next_hh;
    buf ^= 1;
  }

  // dk += scale * dS^T Q and dv += P^T dO for this CTA's keys (it alone owns these rows).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = wm * 16 + g + 8 * half;
    if (r >= k_rows) continue;
    float* dk = p.dk + b * p.dks_b + (k0 + r) * p.dks_n + hk * p.dks_h + wn * (D / 2) + 2 * tq;
    float* dv = p.dv + b * p.dvs_b + (k0 + r) * p.dvs_n + hk * p.dvs_h + wn * (D / 2) + 2 * tq;
#pragma unroll
    for (int n = 0; n < kNd; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        dk[n * 8 + e] += p.scale * dk_acc[n][2 * half + e];
        dv[n * 8 + e] += dv_acc[n][2 * half + e];
      }
    }
  }
}

// ---- generic kernel --------------------------------------------------------------------------

// Tiles of kTile keys and kTile query rows; head dims up to DMax (a power of two, 32..256).
template <int DMax>
struct GenericShape {
  static constexpr int kTile = DMax <= 128 ? 32 : 16;
  static constexpr int kPerS = kTile * kTile / kThreads;  // S / dP elements per thread
  static constexpr int kPerD = kTile * DMax / kThreads;   // dK / dV / dQ elements per thread
  static_assert(kPerS >= 1 && kThreads % kTile == 0 && kThreads % DMax == 0, "thread layout");
  // Row pitch (floats) of the K, V, Q, dO tiles: odd, so that the 32 keys a warp reads in one
  // column of S fall in 32 distinct banks.
  static __host__ __device__ int pitch(int d) { return d % 2 == 0 ? d + 1 : d; }
  static constexpr int kPitchP = kTile + 1;
  static __host__ __device__ size_t smem_bytes(int d) {
    return kTile * sizeof(int64_t) +
           (4 * static_cast<size_t>(kTile) * pitch(d) + 2 * kTile * kPitchP) * sizeof(float);
  }
};

// rows of one head of a [B, N, H, D] tensor (src at the first row) as f32 into dst [kTile][pitch];
// rows in [rows, tile) read as zeros.
template <typename T>
__device__ __forceinline__ void load_rows_f32(float* dst, int pitch, const T* src,
                                              int64_t row_stride, int rows, int tile, int d) {
  for (int idx = threadIdx.x; idx < tile * d; idx += kThreads) {
    const int r = idx / d, c = idx - r * d;
    dst[r * pitch + c] = r < rows ? Elem<T>::load(src + r * row_stride + c) : 0.0f;
  }
}

template <typename T, int DMax>
__global__ void __launch_bounds__(kThreads, 2) bwd_generic_kernel(const BwdParams p) {
  using S = GenericShape<DMax>;
  constexpr int kTile = S::kTile, kPitchP = S::kPitchP, kPerS = S::kPerS, kPerD = S::kPerD;
  const int d = p.head_dim;
  const int pitch = S::pitch(d);
  extern __shared__ __align__(16) unsigned char bwd_smem[];
  int64_t* kpos_s = reinterpret_cast<int64_t*>(bwd_smem);
  float* k_s = reinterpret_cast<float*>(bwd_smem + kTile * sizeof(int64_t));
  float* v_s = k_s + kTile * pitch;
  float* q_s = v_s + kTile * pitch;
  float* do_s = q_s + kTile * pitch;
  float* p_s = do_s + kTile * pitch;  // [kTile][kPitchP]
  float* ds_s = p_s + kTile * kPitchP;

  const int tid = threadIdx.x;
  const KeyTile kt_ = key_tile_of_cta(p, kTile);
  const int64_t b = kt_.b, k0 = kt_.k0, k_lo = kt_.k_lo, k_hi = kt_.k_hi, rot = kt_.rot;
  const int hk = kt_.hk, k_rows = kt_.k_rows;

  int64_t it = next_live_q_tile(p, 0, rot, k_lo, k_hi);
  if (it >= p.q_tiles) return;

  load_rows_f32(k_s, pitch, static_cast<const T*>(p.k) + b * p.ks_b + k0 * p.ks_n + hk * p.ks_h,
                p.ks_n, k_rows, kTile, d);
  load_rows_f32(v_s, pitch, static_cast<const T*>(p.v) + b * p.vs_b + k0 * p.vs_n + hk * p.vs_h,
                p.vs_n, k_rows, kTile, d);
  if (tid < kTile) kpos_s[tid] = tid < k_rows ? p.k_pos[k0 + tid] : 0;

  // S / dP elements: key sj = tid % kTile, rows tid / kTile + e * (kThreads / kTile).
  const int sj = tid % kTile, sr0 = tid / kTile;
  constexpr int kSRowStep = kThreads / kTile;
  // dK / dV elements: column dc = tid % DMax, keys tid / DMax + e * (kThreads / DMax); dQ
  // elements: the same column, query rows likewise.
  const int dc = tid % DMax, dr0 = tid / DMax;
  constexpr int kDRowStep = kThreads / DMax;
  const bool col_ok = dc < d;
  float dk_acc[kPerD], dv_acc[kPerD];
#pragma unroll
  for (int e = 0; e < kPerD; ++e) dk_acc[e] = dv_acc[e] = 0.0f;

  for (; it < p.q_tiles; it = next_live_q_tile(p, it + 1, rot, k_lo, k_hi)) {
    const int64_t qt = rotated_tile(it, rot, p.q_tiles);
    const TileKind kind = tile_kind(p, qt, k_lo, k_hi);
    const int64_t q0 = qt * kTile;
    const int q_rows = static_cast<int>(p.q_len - q0 < kTile ? p.q_len - q0 : kTile);
    for (int hh = 0; hh < p.group; ++hh) {
      const int h = hk * p.group + hh;
      __syncthreads();  // everyone is done with the previous step's Q, dO, P and dS
      load_rows_f32(q_s, pitch, static_cast<const T*>(p.q) + b * p.qs_b + q0 * p.qs_n + h * p.qs_h,
                    p.qs_n, q_rows, kTile, d);
      load_rows_f32(do_s, pitch,
                    static_cast<const T*>(p.dout) + b * p.ds_b + q0 * p.ds_n + h * p.ds_h, p.ds_n,
                    q_rows, kTile, d);
      __syncthreads();

      // S and dP (unscaled), then P and dS.
      {
        float s[kPerS], dp[kPerS];
#pragma unroll
        for (int e = 0; e < kPerS; ++e) s[e] = dp[e] = 0.0f;
        for (int c = 0; c < d; ++c) {
          const float kc = k_s[sj * pitch + c], vc = v_s[sj * pitch + c];
#pragma unroll
          for (int e = 0; e < kPerS; ++e) {
            const int r = sr0 + e * kSRowStep;
            s[e] = fmaf(q_s[r * pitch + c], kc, s[e]);
            dp[e] = fmaf(do_s[r * pitch + c], vc, dp[e]);
          }
        }
#pragma unroll
        for (int e = 0; e < kPerS; ++e) {
          const int r = sr0 + e * kSRowStep;
          float pv = 0.0f, dsv = 0.0f;
          if (r < q_rows && sj < k_rows) {
            const int64_t si = (b * p.heads + h) * p.q_len + q0 + r;
            const float lse = p.lse[si];
            // lse = -inf: nothing visible and no learned sink; the row contributes nothing.
            bool vis = lse != -INFINITY;
            if (vis && kind == TileKind::kPartial) {
              vis = visible(p.causal, p.window, p.sinks, p.q_pos[q0 + r], kpos_s[sj]);
            }
            if (vis) {
              pv = expf(fmaf(s[e], p.scale, -lse));
              dsv = pv * (dp[e] - p.delta[si]);
            }
          }
          p_s[r * kPitchP + sj] = pv;
          ds_s[r * kPitchP + sj] = dsv;
        }
      }
      __syncthreads();

      if (col_ok) {
        // dV += P^T dO, dK += dS^T Q (rows past q_rows are zero in both factors).
        for (int r = 0; r < q_rows; ++r) {
          const float qv = q_s[r * pitch + dc], dov = do_s[r * pitch + dc];
#pragma unroll
          for (int e = 0; e < kPerD; ++e) {
            const int j = dr0 + e * kDRowStep;
            dv_acc[e] = fmaf(p_s[r * kPitchP + j], dov, dv_acc[e]);
            dk_acc[e] = fmaf(ds_s[r * kPitchP + j], qv, dk_acc[e]);
          }
        }
        // dQ += scale * dS K.
#pragma unroll
        for (int e = 0; e < kPerD; ++e) {
          const int r = dr0 + e * kDRowStep;
          if (r >= q_rows) continue;
          float acc = 0.0f;
          for (int j = 0; j < k_rows; ++j)
            acc = fmaf(ds_s[r * kPitchP + j], k_s[j * pitch + dc], acc);
          atomicAdd(p.dq + ((b * p.q_len + q0 + r) * p.heads + h) * static_cast<int64_t>(d) + dc,
                    p.scale * acc);
        }
      }
    }
  }

  if (col_ok) {
#pragma unroll
    for (int e = 0; e < kPerD; ++e) {
      const int j = dr0 + e * kDRowStep;
      if (j >= k_rows) continue;
      p.dk[b * p.dks_b + (k0 + j) * p.dks_n + hk * p.dks_h + dc] += p.scale * dk_acc[e];
      p.dv[b * p.dvs_b + (k0 + j) * p.dvs_n + hk * p.dvs_h + dc] += dv_acc[e];
    }
  }
}

// ---- utilities -------------------------------------------------------------------------------

constexpr int kRowWarps = 8;  // row kernels: one warp per [.., D] row, 8 per CTA

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Grid of a row kernel over `rows` rows, grid-stride beyond 2^20 CTAs.
unsigned row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kRowWarps - 1) / kRowWarps;
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

// Strides (elements) of a [B, N, H, D] view, innermost contiguous.
struct Strides4 {
  int64_t b, n, h;
};

// delta[b, h, i] = sum_c dout[b, i, h, c] * o[b, i, h, c]; rows in (b, i, h) order.
template <typename TO, typename TD>
__global__ void delta_kernel(const TO* o, Strides4 os, const TD* dout, Strides4 ds, float* delta,
                             int64_t q_len, int heads, int d, int64_t rows) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowWarps) + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int h = static_cast<int>(row % heads);
    const int64_t bi = row / heads, i = bi % q_len, b = bi / q_len;
    const TO* orow = o + b * os.b + i * os.n + h * os.h;
    const TD* drow = dout + b * ds.b + i * ds.n + h * ds.h;
    float sum = 0.0f;
    for (int c = lane; c < d; c += 32)
      sum = fmaf(Elem<TO>::load(orow + c), Elem<TD>::load(drow + c), sum);
    sum = warp_sum(sum);
    if (lane == 0) delta[(b * heads + h) * q_len + i] = sum;
  }
}

constexpr int kSinkRows = 4096;  // rows of one (b, h) per CTA of the dsink reduction

// dsink[h] -= sum over rows of exp(z_h - lse) * delta; CTA = (b * H + h) * chunks + chunk.
__global__ void dsink_kernel(const float* lse, const float* delta, const float* z, float* dsink,
                             int64_t q_len, int heads, int64_t chunks) {
  __shared__ float partial[kThreads / 32];
  const int64_t chunk = blockIdx.x % chunks, bh = blockIdx.x / chunks;
  const int h = static_cast<int>(bh % heads);
  const float zh = z[h];
  const int64_t i0 = chunk * kSinkRows;
  const int64_t i1 = i0 + kSinkRows < q_len ? i0 + kSinkRows : q_len;
  float sum = 0.0f;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kThreads) {
    const float l = lse[bh * q_len + i];
    // With a learned sink lse >= z is finite; -inf (no sink in the forward) contributes nothing.
    if (l != -INFINITY) sum += expf(zh - l) * delta[bh * q_len + i];
  }
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.0f;
    s = warp_sum(s);
    if (threadIdx.x == 0) atomicAdd(dsink + h, -s);
  }
}

// out[b, n, h, :] = acc[b, n, h, :] (contiguous f32), rounded to T; rows in (b, n, h) order.
template <typename T>
__global__ void store_kernel(const float* acc, T* out, Strides4 os, int64_t n_len, int heads, int d,
                             int64_t rows) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowWarps) + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int h = static_cast<int>(row % heads);
    const int64_t bn = row / heads, n = bn % n_len, b = bn / n_len;
    const float* src = acc + row * d;
    T* dst = out + b * os.b + n * os.n + h * os.h;
    for (int c = lane; c < d; c += 32) Elem<T>::store(dst + c, src[c]);
  }
}

__global__ void add_kernel(float* dst, Strides4 dsts, const float* src, Strides4 srcs,
                           int64_t n_len, int heads, int d, int64_t rows) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kRowWarps) + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int h = static_cast<int>(row % heads);
    const int64_t bn = row / heads, n = bn % n_len, b = bn / n_len;
    float* drow = dst + b * dsts.b + n * dsts.n + h * dsts.h;
    const float* srow = src + b * srcs.b + n * srcs.n + h * srcs.h;
    for (int c = lane; c < d; c += 32) drow[c] += srow[c];
  }
}

// ---- launchers -------------------------------------------------------------------------------

void check_device_tensor(const TensorView& t, const char* name, const char* shape) {
  RINGATTN_CHECK(t.ndim() == 4, name, " must be ", shape, ", got ", t.describe());
  RINGATTN_CHECK(t.device() == Device::kCUDA, name,
                 " must be a CUDA tensor for the CUDA kernels, got ", device_name(t.device()),
                 " memory");
  RINGATTN_CHECK(t.numel() == 0 || t.stride(3) == 1, name,
                 " needs a contiguous innermost dimension, got ", t.describe());
  RINGATTN_CHECK(t.data() != nullptr || t.numel() == 0, name, " has no data");
}

void check_shape(const TensorView& t, const char* name, const char* shape, int64_t b, int64_t n,
                 int64_t h, int64_t d) {
  RINGATTN_CHECK(t.size(0) == b && t.size(1) == n && t.size(2) == h && t.size(3) == d, name,
                 " must be ", shape, " = [", b, ", ", n, ", ", h, ", ", d, "], got ", t.describe());
}

// dk / dv: f32 accumulators [B, Nk, H_kv, D] whose rows do not overlap.
void check_accumulator(const TensorView& t, const char* name, int64_t b, int64_t n, int64_t h,
                       int64_t d) {
  check_device_tensor(t, name, "[B, Nk, H_kv, D]");
  check_shape(t, name, "[B, Nk, H_kv, D]", b, n, h, d);
  RINGATTN_CHECK(t.dtype() == DType::kF32, name, " accumulator must be f32, got ",
                 dtype_name(t.dtype()));
  RINGATTN_CHECK(t.numel() == 0 || (t.stride(1) >= d && t.stride(2) >= d), name,
                 " needs rows that do not overlap (strides of N and H >= D), got ", t.describe());
}

bool aligned16(const TensorView& t) {
  const bool ptr_ok = reinterpret_cast<uintptr_t>(t.data()) % 16 == 0;
  return ptr_ok && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
}

// The most dynamic shared memory one CTA may opt into on the current device (227 KiB on H100,
// 163 KiB on A100, 99 KiB on sm_86/89).
size_t max_optin_smem() {
  int dev = 0, bytes = 0;
  RINGATTN_CUDA_CHECK(cudaGetDevice(&dev));
  RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return static_cast<size_t>(bytes);
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  // Per device, so set on every launch (a host-side attribute write, no synchronisation).
  RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
}

template <typename T, int D>
void launch_tc(const BwdParams& p, int64_t blocks, cudaStream_t stream) {
  constexpr size_t bytes = TcShape<D>::kSmemBytes;
  set_smem(bwd_tc_kernel<T, D>, bytes);
  bwd_tc_kernel<T, D><<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int DMax>
void launch_generic_dmax(const BwdParams& p, int64_t blocks, cudaStream_t stream) {
  using S = GenericShape<DMax>;
  set_smem(bwd_generic_kernel<T, DMax>, S::smem_bytes(DMax));
  bwd_generic_kernel<T, DMax>
      <<<static_cast<unsigned>(blocks), kThreads, S::smem_bytes(p.head_dim), stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

// The generic kernel's tile (keys and query rows) and shared memory for head dim d.
int generic_tile(int64_t d) {
  return d <= 128 ? GenericShape<128>::kTile : GenericShape<256>::kTile;
}
size_t generic_smem_bytes(int64_t d) {
  const int di = static_cast<int>(d);
  if (d <= 32) return GenericShape<32>::smem_bytes(di);
  if (d <= 64) return GenericShape<64>::smem_bytes(di);
  if (d <= 128) return GenericShape<128>::smem_bytes(di);
  return GenericShape<256>::smem_bytes(di);
}
size_t tc_smem_bytes(int64_t d) {
  return d == 64 ? TcShape<64>::kSmemBytes : TcShape<128>::kSmemBytes;
}

template <typename T>
void launch_generic(const BwdParams& p, int64_t blocks, cudaStream_t stream) {
  const int d = p.head_dim;
  if (d <= 32) {
    launch_generic_dmax<T, 32>(p, blocks, stream);
  } else if (d <= 64) {
    launch_generic_dmax<T, 64>(p, blocks, stream);
  } else if (d <= 128) {
    launch_generic_dmax<T, 128>(p, blocks, stream);
  } else {
    launch_generic_dmax<T, 256>(p, blocks, stream);
  }
}

template <typename TO>
void launch_delta_o(const TensorView& o, const TensorView& dout, const BackwardState& st,
                    cudaStream_t stream) {
  const int64_t rows = st.batch * st.q_len * st.heads;
  const Strides4 os{o.stride(0), o.stride(1), o.stride(2)};
  const Strides4 ds{dout.stride(0), dout.stride(1), dout.stride(2)};
  const unsigned blocks = row_blocks(rows);
  const int heads = static_cast<int>(st.heads), d = static_cast<int>(st.head_dim);
  detail::with_element_type(dout.dtype(), [&](auto t) {
    using TD = decltype(t);
    delta_kernel<<<blocks, kRowWarps * 32, 0, stream>>>(o.data_as<const TO>(), os,
                                                        dout.data_as<const TD>(), ds, st.delta,
                                                        st.q_len, heads, d, rows);
  });
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void check_state(const BackwardState& st) {
  RINGATTN_CHECK(st.batch >= 0 && st.q_len >= 0 && st.heads >= 0 && st.head_dim >= 0,
                 "backward state has negative sizes [B=", st.batch, ", N=", st.q_len,
                 ", H=", st.heads, ", D=", st.head_dim, "]");
  const bool empty = st.batch * st.q_len * st.heads == 0;
  RINGATTN_CHECK(empty || (st.lse != nullptr && st.delta != nullptr && st.dq != nullptr),
                 "backward state needs lse, delta and dq (device pointers), got lse=", st.lse,
                 " delta=", st.delta, " dq=", st.dq);
}

}  // namespace

void backward_begin(const TensorView& o, const TensorView& dout, const BackwardState& st,
                    cudaStream_t stream) {
  check_state(st);
  check_device_tensor(o, "o", "[B, Nq, H, D]");
  check_device_tensor(dout, "dout", "[B, Nq, H, D]");
  check_shape(o, "o", "[B, Nq, H, D]", st.batch, st.q_len, st.heads, st.head_dim);
  check_shape(dout, "dout", "[B, Nq, H, D]", st.batch, st.q_len, st.heads, st.head_dim);
  const int64_t rows = st.batch * st.q_len * st.heads;
  if (rows == 0) return;
  RINGATTN_CUDA_CHECK(
      cudaMemsetAsync(st.dq, 0, static_cast<size_t>(rows * st.head_dim) * sizeof(float), stream));
  detail::with_element_type(o.dtype(),
                            [&](auto t) { launch_delta_o<decltype(t)>(o, dout, st, stream); });
}

void fold_backward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                   const TensorView& k, const TensorView& v, const int64_t* k_pos,
                   const TensorView& dout, const BackwardState& st, const TensorView& dk,
                   const TensorView& dv, cudaStream_t stream, KernelChoice choice) {
  validate_spec(spec);
  check_device_tensor(q, "q", "[B, Nq, H, D]");
  check_device_tensor(k, "k", "[B, Nk, H_kv, D]");
  check_device_tensor(v, "v", "[B, Nk, H_kv, D]");
  check_device_tensor(dout, "dout", "[B, Nq, H, D]");
  const int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), d = q.size(3);
  const int64_t k_len = k.size(1), kv_heads = k.size(2);
  RINGATTN_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype() && dout.dtype() == q.dtype(),
                 "q, k, v and dout must share one dtype, got q ", dtype_name(q.dtype()), ", k ",
                 dtype_name(k.dtype()), ", v ", dtype_name(v.dtype()), ", dout ",
                 dtype_name(dout.dtype()));
  RINGATTN_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads (", heads,
                 ") must be a multiple of kv_heads (", kv_heads, ")");
  check_shape(k, "k", "[B, Nk, H_kv, D]", batch, k_len, kv_heads, d);
  check_shape(v, "v", "[B, Nk, H_kv, D] like k", batch, k_len, kv_heads, d);
  check_shape(dout, "dout", "[B, Nq, H, D] like q", batch, q_len, heads, d);
  check_accumulator(dk, "dk", batch, k_len, kv_heads, d);
  check_accumulator(dv, "dv", batch, k_len, kv_heads, d);
  check_state(st);
  RINGATTN_CHECK(st.batch == batch && st.q_len == q_len && st.heads == heads && st.head_dim == d,
                 "the backward state is sized for [", st.batch, ", ", st.q_len, ", ", st.heads,
                 ", ", st.head_dim, "] but q is ", q.describe());
  RINGATTN_CHECK(d >= 1 && d <= 256, "head_dim ", d,
                 " is not supported by the CUDA kernels (1..256)");
  RINGATTN_CHECK(q_pos != nullptr || q_len == 0, "q_pos (the global query positions) is null");
  RINGATTN_CHECK(k_pos != nullptr || k_len == 0, "k_pos (the global key positions) is null");
  if (batch == 0 || q_len == 0 || k_len == 0) return;

  if (choice == KernelChoice::kAuto) choice = kernel_choice_from_env();
  const bool tc_shape_ok = tensor_core_supported(q.dtype(), d) && aligned16(q) && aligned16(k) &&
                           aligned16(v) && aligned16(dout);
  const size_t smem_limit = max_optin_smem();
  const bool tc_ok = tc_shape_ok && tc_smem_bytes(d) <= smem_limit;
  if (choice == KernelChoice::kTensorCore) {
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, tc_shape_ok,
                        "the tensor-core backward needs bf16 or f16 with head_dim 64 or 128, "
                        "16-byte aligned data and strides that are multiples of 8 for q, k, v and "
                        "dout; got q ",
                        q.describe(), ", k ", k.describe(), ", dout ", dout.describe());
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, tc_ok, "the tensor-core backward for head_dim ", d,
                        " needs ", tc_smem_bytes(d),
                        " bytes of shared memory per CTA; this device allows ", smem_limit);
  }
  const bool use_tc = choice != KernelChoice::kGeneric && tc_ok;
  RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, use_tc || generic_smem_bytes(d) <= smem_limit,
                      "the generic backward for head_dim ", d, " needs ", generic_smem_bytes(d),
                      " bytes of shared memory per CTA; this device allows ", smem_limit);
  const int64_t tile = use_tc ? 64 : generic_tile(d);
  const int64_t q_tiles = (q_len + tile - 1) / tile;
  const int64_t k_tiles = (k_len + tile - 1) / tile;
  const int64_t blocks = k_tiles * batch * kv_heads;
  RINGATTN_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "the backward grid of ", blocks,
                 " CTAs (key tiles x batch x kv heads) exceeds the CUDA limit");

  BwdParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.dout = dout.data();
  p.q_pos = q_pos;
  p.k_pos = k_pos;
  p.lse = st.lse;
  p.delta = st.delta;
  p.dq = st.dq;
  p.dk = dk.data_as<float>();
  p.dv = dv.data_as<float>();
  p.qs_b = q.stride(0), p.qs_n = q.stride(1), p.qs_h = q.stride(2);
  p.ks_b = k.stride(0), p.ks_n = k.stride(1), p.ks_h = k.stride(2);
  p.vs_b = v.stride(0), p.vs_n = v.stride(1), p.vs_h = v.stride(2);
  p.ds_b = dout.stride(0), p.ds_n = dout.stride(1), p.ds_h = dout.stride(2);
  p.dks_b = dk.stride(0), p.dks_n = dk.stride(1), p.dks_h = dk.stride(2);
  p.dvs_b = dv.stride(0), p.dvs_n = dv.stride(1), p.dvs_h = dv.stride(2);
  p.q_len = q_len;
  p.k_len = k_len;
  p.q_tiles = q_tiles;
  p.k_tiles = k_tiles;
  p.heads = static_cast<int>(heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.group = static_cast<int>(heads / kv_heads);
  p.head_dim = static_cast<int>(d);
  p.scale = effective_scale(spec, d);
  p.scale_log2 = p.scale * kLog2e;
  p.causal = spec.causal;
  p.window = spec.window;
  p.sinks = spec.sinks;

  // Position bounds of every query and key tile (stream-ordered per-thread scratch).
  int64_t* bounds = detail::bounds_scratch(2 * (q_tiles + k_tiles));
  p.q_bounds = bounds;
  p.k_bounds = bounds + 2 * q_tiles;
  detail::tile_bounds(q_pos, q_len, static_cast<int>(tile), bounds, stream);
  detail::tile_bounds(k_pos, k_len, static_cast<int>(tile), bounds + 2 * q_tiles, stream);

  if (use_tc) {
    detail::with_tensor_core_config(q.dtype(), d, [&](auto t, auto dim) {
      launch_tc<decltype(t), decltype(dim)::value>(p, blocks, stream);
    });
    return;
  }
  detail::with_element_type(q.dtype(),
                            [&](auto t) { launch_generic<decltype(t)>(p, blocks, stream); });
}

void sink_logits_backward(const BackwardState& st, const float* sink_logits, float* dsink,
                          cudaStream_t stream) {
  check_state(st);
  RINGATTN_CHECK(sink_logits != nullptr, "sink_logits (the learned sink logits [H]) is null");
  RINGATTN_CHECK(dsink != nullptr, "dsink (the [H] f32 gradient of the sink logits) is null");
  RINGATTN_CHECK(st.heads <= std::numeric_limits<int>::max(), "too many heads: ", st.heads);
  if (st.batch * st.q_len * st.heads == 0) return;
  const int64_t chunks = (st.q_len + kSinkRows - 1) / kSinkRows;
  const int64_t blocks = st.batch * st.heads * chunks;
  RINGATTN_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "the dsink grid of ", blocks,
                 " CTAs exceeds the CUDA limit");
  dsink_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      st.lse, st.delta, sink_logits, dsink, st.q_len, static_cast<int>(st.heads), chunks);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void store_f32(const float* acc, const TensorView& out, cudaStream_t stream) {
  check_device_tensor(out, "out", "[B, N, H, D]");
  const int64_t rows = out.size(0) * out.size(1) * out.size(2);
  if (rows * out.size(3) == 0) return;
  RINGATTN_CHECK(acc != nullptr, "store_f32: the f32 accumulator is null");
  RINGATTN_CHECK(out.size(2) <= std::numeric_limits<int>::max() &&
                     out.size(3) <= std::numeric_limits<int>::max(),
                 "out ", out.describe(), " has too many heads or too large a head dim");
  const Strides4 os{out.stride(0), out.stride(1), out.stride(2)};
  const unsigned blocks = row_blocks(rows);
  const int heads = static_cast<int>(out.size(2)), d = static_cast<int>(out.size(3));
  detail::with_element_type(out.dtype(), [&](auto t) {
    using TOut = decltype(t);
    store_kernel<<<blocks, kRowWarps * 32, 0, stream>>>(acc, out.data_as<TOut>(), os, out.size(1),
                                                        heads, d, rows);
  });
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void add_f32(const TensorView& dst, const TensorView& src, cudaStream_t stream) {
  check_device_tensor(dst, "dst", "[B, N, H, D]");
  check_device_tensor(src, "src", "[B, N, H, D]");
  check_shape(src, "src", "[B, N, H, D] like dst", dst.size(0), dst.size(1), dst.size(2),
              dst.size(3));
  RINGATTN_CHECK(dst.dtype() == DType::kF32 && src.dtype() == DType::kF32,
                 "add_f32 needs f32 tensors, got dst ", dtype_name(dst.dtype()), " and src ",
                 dtype_name(src.dtype()));
  const int64_t rows = dst.size(0) * dst.size(1) * dst.size(2);
  if (rows * dst.size(3) == 0) return;
  RINGATTN_CHECK(dst.size(2) <= std::numeric_limits<int>::max() &&
                     dst.size(3) <= std::numeric_limits<int>::max(),
                 "dst ", dst.describe(), " has too many heads or too large a head dim");
  add_kernel<<<row_blocks(rows), kRowWarps * 32, 0, stream>>>(
      dst.data_as<float>(), Strides4{dst.stride(0), dst.stride(1), dst.stride(2)},
      src.data_as<const float>(), Strides4{src.stride(0), src.stride(1), src.stride(2)},
      dst.size(1), static_cast<int>(dst.size(2)), static_cast<int>(dst.size(3)), rows);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ringattn::cuda
