#pragma once
// Device pieces shared by the CUDA forward and backward kernels: element loads/stores for the
// three dtypes, the per-tile position bounds and the scan for the next tile that is not fully
// masked, and the PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16) of the tensor-core
// kernels. Internal to kernels/cuda.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/tile_classify.h"
#include "ringattn/attention.h"
#include "ringattn/tensor.h"

namespace ringattn::cuda::detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- elements --------------------------------------------------------------------------------

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __bfloat162float(*p);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
  }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

// Calls fn(T{}) with T the CUDA element type of `dtype` (__nv_bfloat16, __half or float): the
// one dtype switch of the launchers.
template <typename Fn>
void with_element_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kBF16:
      fn(__nv_bfloat16{});
      break;
    case DType::kF16:
      fn(__half{});
      break;
    default:
      fn(float{});
      break;
  }
}

// Calls fn(T{}, std::integral_constant<int, D>{}) for the tensor-core kernels: bf16 or f16 and
// D = 64 or 128 (the caller checked tensor_core_supported).
template <typename Fn>
void with_tensor_core_config(DType dtype, int64_t head_dim, Fn&& fn) {
  auto by_dim = [&](auto t) {
    if (head_dim == 64) {
      fn(t, std::integral_constant<int, 64>{});
    } else {
      fn(t, std::integral_constant<int, 128>{});
    }
  };
  if (dtype == DType::kBF16) {
    by_dim(__nv_bfloat16{});
  } else {
    by_dim(__half{});
  }
}

// Two f32 values packed into one 32-bit register of two 16-bit elements (low half = a), as the
// mma fragments hold them.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // .x = a (low), .y = b (high)
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// 2^x with the hardware approximation (relative error ~2^-22); ex2(-inf) = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- positions -------------------------------------------------------------------------------

// Bounds (lo, hi) of the positions of each tile of `tile` consecutive entries of pos[0, n)
// (device memory): out[2t] = lo, out[2t+1] = hi for t < ceil(n / tile). Queued on `stream`.
void tile_bounds(const int64_t* pos, int64_t n, int tile, int64_t* out, cudaStream_t stream);

// Per-thread device scratch for tile bounds, at least `count` int64s. Grow-only and owned by the
// calling host thread (each in-process rank is its own thread and stream); a fold's kernels use
// it in stream order, and growing it frees the old buffer with cudaFree, which waits for them.
int64_t* bounds_scratch(int64_t count);

// The first tile t in [t_begin, tiles) whose keys are not all masked for the query box
// [q_lo, q_hi], or `tiles` when none: the 32 lanes of the calling warp test 32 tiles at a time
// (one bounds load each) and agree through a ballot. Every lane of the warp must call it; every
// warp of a block that calls it with the same arguments gets the same answer.
__device__ __forceinline__ int64_t next_tile(const int64_t* bounds, int64_t tiles, int64_t t_begin,
                                             bool causal, int64_t window, int64_t sinks,
                                             int64_t q_lo, int64_t q_hi) {
  const int lane = threadIdx.x & 31;
  for (int64_t base = t_begin; base < tiles; base += 32) {
    const int64_t t = base + lane;
    bool live = false;
    if (t < tiles) {
      live = classify_tile(causal, window, sinks, q_lo, q_hi, bounds[2 * t], bounds[2 * t + 1]) !=
             TileKind::kSkip;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, live);
    if (ballot != 0u) return base + (__ffs(ballot) - 1);
  }
  return tiles;
}

// Min and max over the 32 lanes of a warp (every lane gets both).
__device__ __forceinline__ void warp_bounds(int64_t& lo, int64_t& hi) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t l2 = __shfl_xor_sync(0xffffffffu, lo, o);
    const int64_t h2 = __shfl_xor_sync(0xffffffffu, hi, o);
    lo = l2 < lo ? l2 : lo;
    hi = h2 > hi ? h2 : hi;
  }
}

// ---- PTX wrappers (sm_80+) -------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; src_bytes = 0 writes 16 zero bytes instead.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
// 8-byte asynchronous copy (positions).
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane l supplies the address of row (l % 8) of matrix (l / 8), and
// register i receives, for matrix i, elements (row lane/4, cols 2*(lane%4), +1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}
// As ldmatrix_x4 with each matrix transposed: register i receives, for matrix i, elements
// (rows 2*(lane%4), +1; col lane/4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// D = A * B + D for a 16x16 (row) by 16x8 (col) product, f32 accumulators. Fragments (g = lane/4,
// t = lane%4): a0 (row g, k 2t..2t+1), a1 (row g+8, k 2t..), a2 (row g, k 2t+8..), a3 (row g+8,
// k 2t+8..); b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); d0,d1 (row g, n 2t, 2t+1), d2,d3 (row
// g+8, n 2t, 2t+1).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace ringattn::cuda::detail
