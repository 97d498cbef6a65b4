// Row primitives of the CPU kernel in three variants (see vec_math.h). The AVX variants are
// separate functions with target attributes rather than a -m flag on the file, so the rest of
// the library stays runnable on any x86-64 CPU; the dispatch decision is taken once.

#include "kernels/cpu/vec_math.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "ringattn/error.h"

#if defined(__x86_64__) || defined(__i386__)
// GCC 12.2 warns that the _mm512_undefined_ps() inside several AVX-512 intrinsics is
// uninitialised (GCC PR 105593, fixed in 12.3); the warning points into the header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define RINGATTN_X86 1
#else
#define RINGATTN_X86 0
#endif

namespace ringattn::cpu {
namespace {

// Cody-Waite split of ln 2: n * kLn2Hi is exact for |n| < 2^9, so r = x - n ln2 keeps the
// bits that a single-constant reduction would lose near |x| ~ 88.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
// Cephes expf minimax coefficients: exp(r) = 1 + r + r^2 * P(r) on |r| <= ln2 / 2.
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;
// Beyond these the result is +inf / below FLT_MIN (flushed to 0 by the non-AVX-512 variants).
constexpr float kExpHi = 88.72283935546875f;
constexpr float kExpLo = -87.33654022216797f;

// ---- generic -----------------------------------------------------------------------------------
// Branch-free so that the loops below can be auto-vectorised for the baseline ISA.
inline float exp_generic(float x) {
  const float xc = x > kExpHi ? kExpHi : (x < kExpLo ? kExpLo : x);
  // Round to nearest with the 1.5 * 2^23 trick (valid because |xc * log2e| < 2^22).
  const float big = 12582912.0f;
  const float n = (xc * kLog2e + big) - big;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.0f;
  // 2^n in two halves: n is in [-126, 128] and 2^128 is not a normal float.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  uint32_t b1 = static_cast<uint32_t>(n1 + 127) << 23, b2 = static_cast<uint32_t>(n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof(s1));
  std::memcpy(&s2, &b2, sizeof(s2));
  float y = p * s1 * s2;
  y = x < kExpLo ? 0.0f : y;
  y = x > kExpHi ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;  // NaN in, NaN out
}

void exp_vec_generic(const float* x, float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = exp_generic(x[j]);
}

float row_max_generic(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

float exp_shift_sum_generic(float* s, int64_t n, float m) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_generic(s[j] - m);
    sum += s[j];
  }
  return sum;
}

#if RINGATTN_X86
// ---- AVX2 + FMA --------------------------------------------------------------------------------
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  // min/max return their second operand when either is NaN: keep x second so NaN survives.
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(kExpHi), x);
  xc = _mm256_max_ps(_mm256_set1_ps(kExpLo), xc);
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n as two normal halves (n may be 128 or -126).
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ), y);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x, _mm256_set1_ps(kExpHi), _CMP_GT_OQ));
  return y;
}

__attribute__((target("avx2,fma"))) void exp_vec_avx2(const float* x, float* y, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, exp_avx2(_mm256_loadu_ps(x + j)));
  for (; j < n; ++j) y[j] = exp_generic(x[j]);
}

__attribute__((target("avx2,fma"))) float hmax_avx2(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

__attribute__((target("avx2,fma"))) float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) float row_max_avx2(const float* s, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(s + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(s + j + 8));
  }
  float m = hmax_avx2(_mm256_max_ps(m0, m1));
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

__attribute__((target("avx2,fma"))) float exp_shift_sum_avx2(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  float sum = hsum_avx2(acc);
  for (; j < n; ++j) {
    s[j] = exp_generic(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// ---- AVX-512F ----------------------------------------------------------------------------------
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  // scalef does the 2^n scaling with correct overflow to inf and gradual underflow to 0, so
  // clamping to [-104, 89] (where the result is already 0 / inf) is all the range handling.
  __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
  xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), xc);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) void exp_vec_avx512(const float* x, float* y, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(y + j, exp_avx512(_mm512_loadu_ps(x + j)));
  if (j < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1u);
    _mm512_mask_storeu_ps(y + j, k, exp_avx512(_mm512_maskz_loadu_ps(k, x + j)));
  }
}

__attribute__((target("avx512f"))) float row_max_avx512(const float* s, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
  }
  for (; j + 16 <= n; j += 16) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + j));
  if (j < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1u);
    m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(ninf, k, s + j));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

__attribute__((target("avx512f"))) float exp_shift_sum_avx512(float* s, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  // Two independent chains: the polynomial is latency-bound otherwise.
  for (; j + 32 <= n; j += 32) {
    const __m512 p0 = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
    const __m512 p1 = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), vm));
    _mm512_storeu_ps(s + j, p0);
    _mm512_storeu_ps(s + j + 16, p1);
    acc0 = _mm512_add_ps(acc0, p0);
    acc1 = _mm512_add_ps(acc1, p1);
  }
  for (; j + 16 <= n; j += 16) {
    const __m512 p = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
    _mm512_storeu_ps(s + j, p);
    acc0 = _mm512_add_ps(acc0, p);
  }
  if (j < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1u);
    // Lanes outside the row compute exp(-inf) = 0 and are not stored.
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                          k, s + j);
    const __m512 p = exp_avx512(_mm512_sub_ps(x, vm));
    _mm512_mask_storeu_ps(s + j, k, p);
    acc1 = _mm512_add_ps(acc1, p);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

__attribute__((target("avx512f"))) void scale_row_avx512(float* y, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_loadu_ps(y + j), va));
  for (; j < n; ++j) y[j] *= a;
}
#endif  // RINGATTN_X86

void scale_row_generic(float* y, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) y[j] *= a;
}

struct Dispatch {
  VecIsa isa;
  float (*row_max)(const float*, int64_t);
  float (*exp_shift_sum)(float*, int64_t, float);
  void (*scale_row)(float*, int64_t, float);
};

Dispatch make_dispatch() {
  switch (best_vec_isa()) {
#if RINGATTN_X86
    case VecIsa::kAvx512:
      return {VecIsa::kAvx512, row_max_avx512, exp_shift_sum_avx512, scale_row_avx512};
    case VecIsa::kAvx2:
      return {VecIsa::kAvx2, row_max_avx2, exp_shift_sum_avx2, scale_row_generic};
#endif
    default:
      return {VecIsa::kGeneric, row_max_generic, exp_shift_sum_generic, scale_row_generic};
  }
}

const Dispatch& dispatch() {
  static const Dispatch d = make_dispatch();
  return d;
}

}  // namespace

const char* vec_isa_name(VecIsa isa) {
  switch (isa) {
    case VecIsa::kAvx512: return "avx512";
    case VecIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

bool vec_isa_supported(VecIsa isa) {
  switch (isa) {
    case VecIsa::kGeneric: return true;
#if RINGATTN_X86
    case VecIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case VecIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") != 0;
#endif
    default: return false;
  }
}

VecIsa best_vec_isa() {
  if (vec_isa_supported(VecIsa::kAvx512)) return VecIsa::kAvx512;
  if (vec_isa_supported(VecIsa::kAvx2)) return VecIsa::kAvx2;
  return VecIsa::kGeneric;
}

void exp_vec(VecIsa isa, const float* x, float* y, int64_t n) {
  RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, vec_isa_supported(isa), "exp_vec: this CPU cannot run the ",
                      vec_isa_name(isa), " variant");
  switch (isa) {
#if RINGATTN_X86
    case VecIsa::kAvx512: exp_vec_avx512(x, y, n); return;
    case VecIsa::kAvx2: exp_vec_avx2(x, y, n); return;
#endif
    default: exp_vec_generic(x, y, n); return;
  }
}

float row_max(const float* s, int64_t n) { return dispatch().row_max(s, n); }

float exp_shift_sum(float* s, int64_t n, float m) { return dispatch().exp_shift_sum(s, n, m); }

void scale_row(float* y, int64_t n, float a) { dispatch().scale_row(y, n, a); }

}  // namespace ringattn::cpu
