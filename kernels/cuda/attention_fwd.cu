// The CUDA forward: the block fold of kernels/cpu/attention_cpu.cc on a GPU.
//
// Tensor-core kernel (bf16/f16, D = 64 or 128), FlashAttention-2 style: a CTA of 4 warps owns
// 64 query rows of one (batch, head), 16 rows per warp; Q fragments stay in registers; K/V tiles
// of 64 keys are staged in shared memory with cp.async, the next live tile loading while the
// current one is computed. S = Q K^T and O += P V run on mma.sync m16n8k16 with f32
// accumulators; the online softmax lives in registers in the log2 domain (the state in memory is
// natural-log, converted on load and store). Tiles whose position box is fully masked are never
// loaded: a warp finds the next live tile by testing 32 tile bounds at once.
//
// Generic kernel (any dtype incl. f32, any D <= 256): one warp per query row, lanes over D,
// f32 FMA, the same tile skipping. The fallback and the cross-check of the fast path.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/cuda/attention_common.cuh"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/softmax_state.h"

namespace ringattn::cuda {
namespace detail {

namespace {

__global__ void tile_bounds_kernel(const int64_t* pos, int64_t n, int tile, int64_t tiles,
                                   int64_t* out) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tiles) return;
  const int64_t begin = t * tile;
  const int64_t end = begin + tile < n ? begin + tile : n;
  int64_t lo = pos[begin], hi = pos[begin];
  for (int64_t i = begin + 1; i < end; ++i) {
    const int64_t p = pos[i];
    lo = p < lo ? p : lo;
    hi = p > hi ? p : hi;
  }
  out[2 * t] = lo;
  out[2 * t + 1] = hi;
}

}  // namespace

void tile_bounds(const int64_t* pos, int64_t n, int tile, int64_t* out, cudaStream_t stream) {
  const int64_t tiles = (n + tile - 1) / tile;
  if (tiles == 0) return;
  const int threads = 128;
  const int64_t blocks = (tiles + threads - 1) / threads;
  tile_bounds_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(pos, n, tile, tiles,
                                                                            out);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

int64_t* bounds_scratch(int64_t count) {
  thread_local DeviceBuffer scratch;
  const size_t bytes = static_cast<size_t>(count) * sizeof(int64_t);
  if (scratch.size() < bytes) scratch.resize(bytes);
  return scratch.as<int64_t>();
}

}  // namespace detail

namespace {

using detail::cp_async16;
using detail::cp_async8;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::Elem;
using detail::fast_exp2;
using detail::kLn2;
using detail::kLog2e;
using detail::ldmatrix_x4;
using detail::ldmatrix_x4_trans;
using detail::mma16816;
using detail::next_tile;
using detail::pack2;

constexpr int kTile = 64;  // query rows per CTA (tensor-core kernel) and keys per tile (both)

// Everything a forward fold needs on the device. Strides in elements.
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const int64_t* q_pos;
  const int64_t* k_pos;
  const int64_t* q_bounds;  // [q tiles][2] (tensor-core kernel)
  const int64_t* k_bounds;  // [k tiles][2]
  float* m;                 // [B, H, Nq] natural log
  float* l;                 // [B, H, Nq]
  float* acc;               // [B, Nq, H, D]
  int64_t qs_b, qs_n, qs_h;
  int64_t ks_b, ks_n, ks_h;
  int64_t vs_b, vs_n, vs_h;
  int64_t q_len, k_len, k_tiles;
  int heads, group, head_dim;
  float scale_log2;  // scale * log2(e)
  bool causal;
  int64_t window, sinks;
};

// ---- tensor-core kernel ----------------------------------------------------------------------

template <int D>
struct TcShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPitch = D + 8;  // elements: +16 bytes per row keeps ldmatrix conflict-free
  static constexpr int kTileElems = kTile * kPitch;
  // Q, K[2], V[2] tiles, then the key positions of the two K/V buffers.
  static constexpr size_t kSmemBytes = 5 * kTileElems * 2 + 2 * kTile * sizeof(int64_t);
};

template <typename T, int D>
__global__ void __launch_bounds__(TcShape<D>::kThreads) fold_tc_kernel(const FwdParams p) {
  using S = TcShape<D>;
  constexpr int kPitch = S::kPitch;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + S::kTileElems;                                           // two buffers
  T* v_s = k_s + 2 * S::kTileElems;                                       // two buffers
  int64_t* kpos_s = reinterpret_cast<int64_t*>(v_s + 2 * S::kTileElems);  // [2][kTile]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int64_t q_tile = blockIdx.x;
  const int bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  const int64_t q0 = q_tile * kTile;
  const int64_t q_lo = p.q_bounds[2 * q_tile], q_hi = p.q_bounds[2 * q_tile + 1];

  const T* q_base = static_cast<const T*>(p.q) + b * p.qs_b + h * p.qs_h;
  const T* k_base = static_cast<const T*>(p.k) + b * p.ks_b + hk * p.ks_h;
  const T* v_base = static_cast<const T*>(p.v) + b * p.vs_b + hk * p.vs_h;

  // Q tile -> shared (rows past the end read as zeros).
  for (int c = tid; c < kTile * kChunks; c += S::kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int64_t n = q0 + r;
    const bool ok = n < p.q_len;
    cp_async16(q_s + r * kPitch + col, ok ? q_base + n * p.qs_n + col : q_base, ok ? 16 : 0);
  }
  auto load_kv = [&](int64_t t, int buf) {
    T* ks = k_s + buf * S::kTileElems;
    T* vs = v_s + buf * S::kTileElems;
    for (int c = tid; c < kTile * kChunks; c += S::kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const int64_t n = t * kTile + r;
      const bool ok = n < p.k_len;
      // Rows past the end must be zeros, not garbage: P is 0 there but 0 * NaN is NaN.
      cp_async16(ks + r * kPitch + col, ok ? k_base + n * p.ks_n + col : k_base, ok ? 16 : 0);
      cp_async16(vs + r * kPitch + col, ok ? v_base + n * p.vs_n + col : v_base, ok ? 16 : 0);
    }
    if (tid < kTile) {
      const int64_t n = t * kTile + tid;
      const bool ok = n < p.k_len;
      cp_async8(kpos_s + buf * kTile + tid, ok ? p.k_pos + n : p.k_pos, ok ? 8 : 0);
    }
  };

  int64_t t = next_tile(p.k_bounds, p.k_tiles, 0, p.causal, p.window, p.sinks, q_lo, q_hi);
  if (t < p.k_tiles) load_kv(t, 0);
  cp_async_commit();

  // This thread's two rows (g and g+8 of the warp's 16) and their positions.
  const int row0 = warp * 16 + g;
  int64_t qn[2], qpos[2];
  bool q_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    qn[i] = q0 + row0 + 8 * i;
    q_ok[i] = qn[i] < p.q_len;
    qpos[i] = q_ok[i] ? p.q_pos[qn[i]] : 0;
  }

  // The state of the two rows: m in the log2 domain; l partial per thread (the quad's four
  // partials sum to the row's l: thread tq == 0 starts with the stored value).
  float m2[2], lsum[2];
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t si = (static_cast<int64_t>(b) * p.heads + h) * p.q_len + qn[i];
    const float m_nat = q_ok[i] ? p.m[si] : -INFINITY;
    m2[i] = m_nat == -INFINITY ? -INFINITY : m_nat * kLog2e;
    lsum[i] = (q_ok[i] && tq == 0) ? p.l[si] : 0.0f;
  }
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float2 a = make_float2(0.0f, 0.0f);
      if (q_ok[i]) {
        const float* ap = p.acc + ((static_cast<int64_t>(b) * p.q_len + qn[i]) * p.heads + h) * D +
                          nd * 8 + 2 * tq;
        a = *reinterpret_cast<const float2*>(ap);
      }
      o[nd][2 * i] = a.x;
      o[nd][2 * i + 1] = a.y;
    }
  }

  cp_async_wait<0>();
  __syncthreads();
  // Q fragments for the warp's 16 rows, kept in registers for the whole fold.
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qf[kk], q_s + (warp * 16 + (lane % 16)) * kPitch + kk * 16 + (lane / 16) * 8);
  }

  int buf = 0;
  while (t < p.k_tiles) {
    const int64_t t_next =
        next_tile(p.k_bounds, p.k_tiles, t + 1, p.causal, p.window, p.sinks, q_lo, q_hi);
    if (t_next < p.k_tiles) load_kv(t_next, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // the current tile's group has landed (the next one may be in flight)
    __syncthreads();

    const T* ks = k_s + buf * S::kTileElems;
    const T* vs = v_s + buf * S::kTileElems;
    const int64_t* kp = kpos_s + buf * kTile;
    const TileKind kind = classify_tile(p.causal, p.window, p.sinks, q_lo, q_hi, p.k_bounds[2 * t],
                                        p.k_bounds[2 * t + 1]);
    const bool need_mask = kind != TileKind::kFull || (t + 1) * kTile > p.k_len;

    // S = Q K^T for 16 rows x 64 keys: 8 blocks of 8 keys.
    float s[kTile / 8][4];
#pragma unroll
    for (int nb = 0; nb < kTile / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nb = 0; nb < kTile / 8; nb += 2) {
        // Matrices: keys nb*8.. and (nb+1)*8.., each at d kk*16 and kk*16+8.
        const int mi = lane / 8, r = lane % 8;
        uint32_t kf[4];
        ldmatrix_x4(kf, ks + (nb * 8 + (mi / 2) * 8 + r) * kPitch + kk * 16 + (mi % 2) * 8);
        mma16816<T>(s[nb], qf[kk], kf[0], kf[1]);
        mma16816<T>(s[nb + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // Scale into the log2 domain and mask.
#pragma unroll
    for (int nb = 0; nb < kTile / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nb][e] * p.scale_log2;
        if (need_mask) {
          const int col = nb * 8 + 2 * tq + (e & 1);
          const int i = e >> 1;
          const bool ok =
              t * kTile + col < p.k_len && visible(p.causal, p.window, p.sinks, qpos[i], kp[col]);
          if (!ok) x = -INFINITY;
        }
        s[nb][e] = x;
      }
    }

    // Online softmax per row (the quad of 4 threads shares a row).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * i], s[nb][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m2[i], mx);
      // m_new == -inf: nothing visible yet; exp2(-inf - 0) = 0 keeps the row empty, never NaN.
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = m2[i] == -INFINITY ? 0.0f : fast_exp2(m2[i] - base);
      m2[i] = m_new;
      lsum[i] *= alpha;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        o[nd][2 * i] *= alpha;
        o[nd][2 * i + 1] *= alpha;
      }
#pragma unroll
      for (int nb = 0; nb < kTile / 8; ++nb) {
        const float p0 = fast_exp2(s[nb][2 * i] - base);
        const float p1 = fast_exp2(s[nb][2 * i + 1] - base);
        s[nb][2 * i] = p0;
        s[nb][2 * i + 1] = p1;
        lsum[i] += p0 + p1;
      }
    }

    // O += P V: P from the S accumulators (two 8-key blocks make one 16-key A fragment).
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t pf[4];
      pf[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pf[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pf[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pf[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 8; nd += 2) {
        // Matrices (transposed): keys kk*16.. and kk*16+8.., at d nd*8 and (nd+1)*8.
        const int mi = lane / 8, r = lane % 8;
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, vs + (kk * 16 + (mi % 2) * 8 + r) * kPitch + nd * 8 + (mi / 2) * 8);
        mma16816<T>(o[nd], pf, vf[0], vf[1]);
        mma16816<T>(o[nd + 1], pf, vf[2], vf[3]);
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
    buf ^= 1;
    t = t_next;
  }
  cp_async_wait<0>();

  // Store the state.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float lr = lsum[i];
    lr += __shfl_xor_sync(0xffffffffu, lr, 1);
    lr += __shfl_xor_sync(0xffffffffu, lr, 2);
    if (!q_ok[i]) continue;
    if (tq == 0) {
      const int64_t si = (static_cast<int64_t>(b) * p.heads + h) * p.q_len + qn[i];
      p.m[si] = m2[i] == -INFINITY ? -INFINITY : m2[i] * kLn2;
      p.l[si] = lr;
    }
    float* ap = p.acc + ((static_cast<int64_t>(b) * p.q_len + qn[i]) * p.heads + h) * D + 2 * tq;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      *reinterpret_cast<float2*>(ap + nd * 8) = make_float2(o[nd][2 * i], o[nd][2 * i + 1]);
    }
  }
}

// ---- generic kernel --------------------------------------------------------------------------

constexpr int kGenericWarps = 4;
constexpr int kMaxPerLane = 8;  // D <= 256

// One warp per (b, query row, head); lane c holds columns c, c + 32, ... of the row.
template <typename T>
__global__ void __launch_bounds__(kGenericWarps * 32) fold_generic_kernel(const FwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * static_cast<int64_t>(kGenericWarps) + warp;
  const int b = blockIdx.y;
  if (row >= p.q_len * p.heads) return;
  const int64_t i = row / p.heads;
  const int h = static_cast<int>(row % p.heads), hk = h / p.group;
  const int d = p.head_dim;
  const int64_t qp = p.q_pos[i];

  const T* qr = static_cast<const T*>(p.q) + b * p.qs_b + i * p.qs_n + h * p.qs_h;
  const T* k_base = static_cast<const T*>(p.k) + b * p.ks_b + hk * p.ks_h;
  const T* v_base = static_cast<const T*>(p.v) + b * p.vs_b + hk * p.vs_h;
  float qv[kMaxPerLane], acc[kMaxPerLane];
  const int64_t si = (static_cast<int64_t>(b) * p.heads + h) * p.q_len + i;
  float* ap = p.acc + ((static_cast<int64_t>(b) * p.q_len + i) * p.heads + h) * d;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int col = lane + 32 * c;
    qv[c] = col < d ? Elem<T>::load(qr + col) : 0.0f;
    acc[c] = col < d ? ap[col] : 0.0f;
  }
  const float m_nat = p.m[si];
  float m2 = m_nat == -INFINITY ? -INFINITY : m_nat * kLog2e;
  float l = p.l[si];

  int64_t t = next_tile(p.k_bounds, p.k_tiles, 0, p.causal, p.window, p.sinks, qp, qp);
  while (t < p.k_tiles) {
    const int64_t j_end = (t + 1) * kTile < p.k_len ? (t + 1) * kTile : p.k_len;
    for (int64_t j = t * kTile; j < j_end; ++j) {
      if (!visible(p.causal, p.window, p.sinks, qp, p.k_pos[j])) continue;
      const T* kr = k_base + j * p.ks_n;
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < kMaxPerLane; ++c) {
        const int col = lane + 32 * c;
        if (col < d) dot = fmaf(qv[c], Elem<T>::load(kr + col), dot);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      const float x = dot * p.scale_log2;
      const float m_new = fmaxf(m2, x);
      const float alpha = m2 == -INFINITY ? 0.0f : exp2f(m2 - m_new);
      const float pj = exp2f(x - m_new);
      m2 = m_new;
      l = l * alpha + pj;
      const T* vr = v_base + j * p.vs_n;
#pragma unroll
      for (int c = 0; c < kMaxPerLane; ++c) {
        const int col = lane + 32 * c;
        if (col < d) acc[c] = acc[c] * alpha + pj * Elem<T>::load(vr + col);
      }
    }
    t = next_tile(p.k_bounds, p.k_tiles, t + 1, p.causal, p.window, p.sinks, qp, qp);
  }
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int col = lane + 32 * c;
    if (col < d) ap[col] = acc[c];
  }
  if (lane == 0) {
    p.m[si] = m2 == -INFINITY ? -INFINITY : m2 * kLn2;
    p.l[si] = l;
  }
}

// ---- state kernels ---------------------------------------------------------------------------

__global__ void fill_kernel(float* x, int64_t n, float value) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) x[i] = value;
}

// One warp per (b, i, h) row: o = acc * f, lse (kernels/softmax_state.h finalize_row).
template <typename T>
__global__ void finalize_kernel(const float* m, const float* l, const float* acc,
                                const float* sink_logits, T* o, int64_t os_b, int64_t os_n,
                                int64_t os_h, float* lse, int64_t batch, int64_t q_len, int heads,
                                int d) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= batch * q_len * heads) return;
  const int h = static_cast<int>(row % heads);
  const int64_t i = (row / heads) % q_len;
  const int64_t b = row / (static_cast<int64_t>(heads) * q_len);
  const int64_t si = (b * heads + h) * q_len + i;
  float row_lse = 0.0f;
  const bool has_sink = sink_logits != nullptr;
  const float f = finalize_row(m[si], l[si], has_sink, has_sink ? sink_logits[h] : 0.0f, &row_lse);
  const float* a = acc + row * d;  // acc is [B, Nq, H, D]: row (b, i, h) is row-major
  T* out = o + b * os_b + i * os_n + h * os_h;
  for (int c = lane; c < d; c += 32) Elem<T>::store(out + c, a[c] * f);
  if (lane == 0 && lse != nullptr) lse[si] = row_lse;
}

// ---- launchers -------------------------------------------------------------------------------

void check_device_tensor(const TensorView& t, const char* name) {
  RINGATTN_CHECK(t.ndim() == 4, name, " must be [B, N, H, D], got ", t.describe());
  RINGATTN_CHECK(t.device() == Device::kCUDA, name,
                 " must be a CUDA tensor for the CUDA kernels, got ", device_name(t.device()),
                 " memory");
  RINGATTN_CHECK(t.numel() == 0 || t.stride(3) == 1, name,
                 " needs a contiguous innermost dimension, got ", t.describe());
  RINGATTN_CHECK(t.data() != nullptr || t.numel() == 0, name, " has no data");
}

bool aligned16(const TensorView& t) {
  const bool ptr_ok = reinterpret_cast<uintptr_t>(t.data()) % 16 == 0;
  return ptr_ok && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
}

template <typename T, int D>
void launch_tc(const FwdParams& p, int64_t batch, int64_t q_tiles, cudaStream_t stream) {
  using S = TcShape<D>;
  // Per device (a function attribute lives in the current device's context), so set it on
  // every launch: a static once-only call would leave a second device at the 48 KiB default.
  RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(fold_tc_kernel<T, D>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(S::kSmemBytes)));
  const dim3 grid(static_cast<unsigned>(q_tiles), static_cast<unsigned>(batch * p.heads));
  fold_tc_kernel<T, D><<<grid, S::kThreads, S::kSmemBytes, stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_generic(const FwdParams& p, int64_t batch, cudaStream_t stream) {
  const int64_t blocks = (p.q_len * p.heads + kGenericWarps - 1) / kGenericWarps;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(batch));
  fold_generic_kernel<T><<<grid, kGenericWarps * 32, 0, stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_finalize(const ForwardState& st, const float* sink_logits, const TensorView& o,
                     float* lse, cudaStream_t stream) {
  const int64_t rows = st.batch * st.q_len * st.heads;
  const int warps = 8;
  const int64_t blocks = (rows + warps - 1) / warps;
  finalize_kernel<T><<<static_cast<unsigned>(blocks), warps * 32, 0, stream>>>(
      st.m, st.l, st.acc, sink_logits, o.data_as<T>(), o.stride(0), o.stride(1), o.stride(2), lse,
      st.batch, st.q_len, static_cast<int>(st.heads), static_cast<int>(st.head_dim));
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

KernelChoice kernel_choice_from_env() {
  const char* env = std::getenv("RINGATTN_CUDA_KERNEL");
  if (env == nullptr || *env == '\0' || !std::strcmp(env, "auto")) return KernelChoice::kAuto;
  if (!std::strcmp(env, "mma")) return KernelChoice::kTensorCore;
  if (!std::strcmp(env, "generic")) return KernelChoice::kGeneric;
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "RINGATTN_CUDA_KERNEL='", env,
                 "': expected auto, mma or generic");
}

bool tensor_core_supported(DType dtype, int64_t head_dim) {
  return (dtype == DType::kBF16 || dtype == DType::kF16) && (head_dim == 64 || head_dim == 128);
}

void reserve_fold_scratch(int64_t q_len, int64_t k_len) {
  detail::bounds_scratch(2 * ((q_len + kTile - 1) / kTile + (k_len + kTile - 1) / kTile));
}

void reset_state(const ForwardState& st, cudaStream_t stream) {
  const int64_t rows = st.batch * st.heads * st.q_len;
  if (rows > 0) {
    fill_kernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(st.m, rows,
                                                                               -INFINITY);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  }
  memset_async(st.l, 0, static_cast<size_t>(rows) * sizeof(float), stream);
  memset_async(st.acc, 0, static_cast<size_t>(rows * st.head_dim) * sizeof(float), stream);
}

TileCount count_tiles(const AttentionSpec& spec, DType dtype, int64_t head_dim, int64_t batch,
                      int64_t heads, const int64_t* q_pos, int64_t q_len, const int64_t* k_pos,
                      int64_t k_len) {
  (void)dtype;
  TileCount tc;
  auto bounds = [](const int64_t* pos, int64_t begin, int64_t end, int64_t* lo, int64_t* hi) {
    *lo = pos[begin];
    *hi = pos[begin];
    for (int64_t i = begin + 1; i < end; ++i) {
      *lo = std::min(*lo, pos[i]);
      *hi = std::max(*hi, pos[i]);
    }
  };
  const int64_t kt_count = (k_len + kTile - 1) / kTile;
  // Key tile bounds once; query tiles one at a time.
  std::vector<int64_t> kb(static_cast<size_t>(2 * kt_count));
  for (int64_t t = 0; t < kt_count; ++t) {
    bounds(k_pos, t * kTile, std::min(k_len, (t + 1) * kTile), &kb[2 * t], &kb[2 * t + 1]);
  }
  for (int64_t q0 = 0; q0 < q_len; q0 += kTile) {
    const int64_t rows = std::min<int64_t>(kTile, q_len - q0);
    int64_t qlo = 0, qhi = 0;
    bounds(q_pos, q0, q0 + rows, &qlo, &qhi);
    for (int64_t t = 0; t < kt_count; ++t) {
      const TileKind kind =
          classify_tile(spec.causal, spec.window, spec.sinks, qlo, qhi, kb[2 * t], kb[2 * t + 1]);
      if (kind == TileKind::kSkip) {
        tc.skipped += batch * heads;
        continue;
      }
      const int64_t keys = std::min<int64_t>(kTile, k_len - t * kTile);
      tc.computed += batch * heads;
      tc.flops += 4.0 * static_cast<double>(batch * heads * rows * keys * head_dim);
    }
  }
  return tc;
}

void fold_forward(const AttentionSpec& spec, const TensorView& q, const int64_t* q_pos,
                  const TensorView& k, const TensorView& v, const int64_t* k_pos,
                  const ForwardState& st, cudaStream_t stream, KernelChoice choice) {
  check_device_tensor(q, "q");
  check_device_tensor(k, "k");
  check_device_tensor(v, "v");
  const int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), d = q.size(3);
  const int64_t k_len = k.size(1), kv_heads = k.size(2);
  RINGATTN_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(),
                 "q, k and v must share one dtype, got ", q.describe(), ", ", k.describe(), ", ",
                 v.describe());
  RINGATTN_CHECK(k.size(0) == batch && v.size(0) == batch && k.size(3) == d && v.size(3) == d &&
                     v.size(1) == k_len && v.size(2) == kv_heads,
                 "k and v must be [", batch, ", Nk, H_kv, ", d, "] alike, got ", k.describe(),
                 " and ", v.describe());
  RINGATTN_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads (", heads,
                 ") must be a multiple of kv_heads (", kv_heads, ")");
  RINGATTN_CHECK(st.batch == batch && st.q_len == q_len && st.heads == heads && st.head_dim == d,
                 "the state is sized for [", st.batch, ", ", st.q_len, ", ", st.heads, ", ",
                 st.head_dim, "] but q is ", q.describe());
  RINGATTN_CHECK(d >= 1 && d <= 32 * kMaxPerLane, "head_dim ", d,
                 " is not supported by the CUDA kernels (1..256)");
  RINGATTN_CHECK(batch * heads <= 65535, "batch * heads = ", batch * heads,
                 " exceeds the CUDA grid limit of 65535");
  if (q_len == 0 || k_len == 0 || batch == 0) return;

  if (choice == KernelChoice::kAuto) choice = kernel_choice_from_env();
  const bool tc_ok =
      tensor_core_supported(q.dtype(), d) && aligned16(q) && aligned16(k) && aligned16(v);
  if (choice == KernelChoice::kTensorCore) {
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, tc_ok,
                        "the tensor-core kernel needs bf16 or f16 with head_dim 64 or 128, "
                        "16-byte aligned data and strides that are multiples of 8; got ",
                        q.describe());
  }
  const bool use_tc = choice != KernelChoice::kGeneric && tc_ok;

  FwdParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.q_pos = q_pos;
  p.k_pos = k_pos;
  p.m = st.m;
  p.l = st.l;
  p.acc = st.acc;
  p.qs_b = q.stride(0), p.qs_n = q.stride(1), p.qs_h = q.stride(2);
  p.ks_b = k.stride(0), p.ks_n = k.stride(1), p.ks_h = k.stride(2);
  p.vs_b = v.stride(0), p.vs_n = v.stride(1), p.vs_h = v.stride(2);
  p.q_len = q_len;
  p.k_len = k_len;
  p.k_tiles = (k_len + kTile - 1) / kTile;
  p.heads = static_cast<int>(heads);
  p.group = static_cast<int>(heads / kv_heads);
  p.head_dim = static_cast<int>(d);
  p.scale_log2 = effective_scale(spec, d) * kLog2e;
  p.causal = spec.causal;
  p.window = spec.window;
  p.sinks = spec.sinks;

  const int64_t q_tiles = (q_len + kTile - 1) / kTile;
  int64_t* bounds = detail::bounds_scratch(2 * (q_tiles + p.k_tiles));
  p.q_bounds = bounds;
  p.k_bounds = bounds + 2 * q_tiles;
  detail::tile_bounds(q_pos, q_len, kTile, bounds, stream);
  detail::tile_bounds(k_pos, k_len, kTile, bounds + 2 * q_tiles, stream);

  if (use_tc) {
    detail::with_tensor_core_config(q.dtype(), d, [&](auto t, auto dim) {
      launch_tc<decltype(t), decltype(dim)::value>(p, batch, q_tiles, stream);
    });
    return;
  }
  detail::with_element_type(q.dtype(),
                            [&](auto t) { launch_generic<decltype(t)>(p, batch, stream); });
}

void finalize_forward(const ForwardState& st, const float* sink_logits, const TensorView& o,
                      float* lse, cudaStream_t stream) {
  check_device_tensor(o, "o");
  RINGATTN_CHECK(o.size(0) == st.batch && o.size(1) == st.q_len && o.size(2) == st.heads &&
                     o.size(3) == st.head_dim,
                 "o must be [", st.batch, ", ", st.q_len, ", ", st.heads, ", ", st.head_dim,
                 "], got ", o.describe());
  if (st.batch * st.q_len * st.heads == 0) return;
  detail::with_element_type(
      o.dtype(), [&](auto t) { launch_finalize<decltype(t)>(st, sink_logits, o, lse, stream); });
}

}  // namespace ringattn::cuda
