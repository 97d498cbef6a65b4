#pragma once
/// Vectorised row primitives of the CPU kernel: the exponential and the row reductions of the
/// online softmax. x86-64 builds target baseline SSE2, so the AVX2+FMA and AVX-512 versions are
/// compiled with function target attributes and chosen at run time from the CPU's features;
/// other CPUs (and old x86) use a portable version that the compiler may auto-vectorise.
///
/// The exponential is a Cody-Waite range reduction plus a degree-7 (Cephes) polynomial:
/// about 1 ulp over the normal range; exp(-inf) = 0, exp(x) for x below ln(FLT_MIN) is 0 (or a
/// subnormal), exp(+inf) = +inf, NaN stays NaN.

#include <cstdint>

namespace ringattn::cpu {

/// Instruction-set variants of the row primitives.
enum class VecIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

/// "generic", "avx2", "avx512".
const char* vec_isa_name(VecIsa isa);
/// Whether this CPU (and this build) can run a variant.
bool vec_isa_supported(VecIsa isa);
/// The variant the kernel uses: the best supported one.
VecIsa best_vec_isa();

/// y[j] = exp(x[j]) for j < n with the given variant (x and y may alias). For tests and tools.
void exp_vec(VecIsa isa, const float* x, float* y, int64_t n);

/// Maximum of s[0..n) with the best variant; -inf for n == 0.
float row_max(const float* s, int64_t n);

/// s[j] = exp(s[j] - m) in place for j < n (masked logits -inf become 0) with the best
/// variant; returns the sum of the new s. m must be finite.
float exp_shift_sum(float* s, int64_t n, float m);

/// y[j] *= a for j < n (contiguous).
void scale_row(float* y, int64_t n, float a);

}  // namespace ringattn::cpu
