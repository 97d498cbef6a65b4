// Element types and TensorView.
//
// f16 is checked against the compiler's own IEEE binary16 (`_Float16`, round to nearest even),
// bf16 against an independent reference written here from distances in double. Both directions
// are exhaustive over the 65536 16-bit patterns; f32 -> 16-bit is checked at every rounding
// boundary (each representable value, each midpoint, one f32 ulp either side) plus millions of
// f32 bit patterns.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ringattn/error.h"
#include "ringattn/tensor.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// Independent references.

// The compiler's binary16 conversion. `volatile` keeps GCC from folding constants through a
// path that might differ from the runtime one.
uint16_t gcc_f16_bits(float f) {
  volatile float in = f;
  const _Float16 h = static_cast<_Float16>(in);
  uint16_t bits;
  memcpy(&bits, &h, sizeof(bits));
  return bits;
}

float gcc_f16_value(uint16_t bits) {
  _Float16 h;
  memcpy(&h, &bits, sizeof(bits));
  volatile _Float16 vh = h;
  return static_cast<float>(vh);
}

bool f16_is_nan(uint16_t b) { return (b & 0x7c00u) == 0x7c00u && (b & 0x3ffu) != 0; }
bool bf16_is_nan(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

float from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// The value of bf16 magnitude pattern `mag` (sign bit clear) in double; 0x7f80 (the pattern
// after the largest finite one) is taken as 2^128, the "next binade" IEEE rounding uses to
// decide overflow.
double bf16_mag_value(uint32_t mag) {
  if (mag == 0x7f80u) return std::ldexp(1.0, 128);
  const uint32_t exp = mag >> 7, mant = mag & 0x7fu;
  if (exp == 0) return std::ldexp(static_cast<double>(mant), -133);  // subnormal: mant * 2^-133
  return std::ldexp(1.0 + mant / 128.0, static_cast<int>(exp) - 127);
}

// f32 -> bf16 by choosing the nearer of the two bf16 neighbours in double (ties: even
// mantissa). Not for NaN.
uint16_t ref_bf16_bits(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  const double x = std::fabs(static_cast<double>(f));
  if (std::isinf(f)) return static_cast<uint16_t>(sign | 0x7f80u);
  // Largest bf16 magnitude <= x, by binary search over the ordered patterns 0..0x7f7f.
  uint32_t lo = 0, hi = 0x7f7fu;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) / 2;
    if (bf16_mag_value(mid) <= x)
      lo = mid;
    else
      hi = mid - 1;
  }
  const double below = bf16_mag_value(lo), above = bf16_mag_value(lo + 1);
  const double d_below = x - below, d_above = above - x;  // exact: all values are short
  uint32_t r;
  if (d_below < d_above)
    r = lo;
  else if (d_above < d_below)
    r = lo + 1;
  else
    r = (lo & 1u) ? lo + 1 : lo;
  return static_cast<uint16_t>(sign | r);
}

// ---------------------------------------------------------------------------------------------
// f16

TEST(F16, EveryPatternWidensExactlyAsTheCompilerDoes) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float got = f16_to_float(F16{bits});
    const float want = gcc_f16_value(bits);
    if (f16_is_nan(bits)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << b;
      ASSERT_EQ(std::signbit(got), (b & 0x8000u) != 0) << std::hex << b;
    } else {
      ASSERT_EQ(float_bits(got), float_bits(want)) << std::hex << b << " got " << got;
    }
  }
}

TEST(F16, EveryPatternRoundTripsBitExactlyAndNanStaysNan) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const uint16_t back = float_to_f16(f16_to_float(F16{bits})).bits;
    if (f16_is_nan(bits)) {
      ASSERT_TRUE(f16_is_nan(back)) << std::hex << b << " -> " << back;
      ASSERT_EQ(back & 0x8000u, b & 0x8000u) << std::hex << b;
    } else {
      ASSERT_EQ(back, bits) << std::hex << b;
    }
  }
}

TEST(F16, KnownValues) {
  EXPECT_EQ(float_to_f16(0.0f).bits, 0x0000u);
  EXPECT_EQ(float_to_f16(-0.0f).bits, 0x8000u);
  EXPECT_EQ(float_to_f16(1.0f).bits, 0x3c00u);
  EXPECT_EQ(float_to_f16(-2.0f).bits, 0xc000u);
  EXPECT_EQ(float_to_f16(65504.0f).bits, 0x7bffu);               // largest finite
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -14)).bits, 0x0400u);  // smallest normal
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -24)).bits, 0x0001u);  // smallest subnormal
  EXPECT_EQ(float_to_f16(INFINITY).bits, 0x7c00u);
  EXPECT_EQ(float_to_f16(-INFINITY).bits, 0xfc00u);
  EXPECT_EQ(float_to_f16(FLT_MAX).bits, 0x7c00u);
  EXPECT_EQ(float_to_f16(FLT_MIN).bits, 0x0000u);
  EXPECT_EQ(float_to_f16(-FLT_MIN).bits, 0x8000u);
  EXPECT_TRUE(f16_is_nan(float_to_f16(NAN).bits));
  EXPECT_TRUE(f16_is_nan(float_to_f16(from_bits(0x7f800001u)).bits));  // signalling payload 1
  EXPECT_TRUE(f16_is_nan(float_to_f16(from_bits(0xff800001u)).bits));
  EXPECT_EQ(float_to_f16(from_bits(0xff800001u)).bits & 0x8000u, 0x8000u);
}

TEST(F16, OverflowThresholdIs65520) {
  // 65520 is the midpoint between 65504 (odd mantissa 0x3ff) and 65536: ties to even -> inf.
  EXPECT_EQ(float_to_f16(65520.0f).bits, 0x7c00u);
  EXPECT_EQ(float_to_f16(-65520.0f).bits, 0xfc00u);
  EXPECT_EQ(float_to_f16(std::nextafter(65520.0f, 0.0f)).bits, 0x7bffu);
  EXPECT_EQ(float_to_f16(-std::nextafter(65520.0f, 0.0f)).bits, 0xfbffu);
  EXPECT_EQ(float_to_f16(65519.0f).bits, 0x7bffu);
  EXPECT_EQ(float_to_f16(70000.0f).bits, 0x7c00u);
}

TEST(F16, TiesGoToEven) {
  // 1 + 2^-11 lies halfway between 1 (even) and 1 + 2^-10 (odd): -> 1.
  EXPECT_EQ(float_to_f16(1.0f + std::ldexp(1.0f, -11)).bits, 0x3c00u);
  // 1 + 3*2^-11 lies halfway between 1 + 2^-10 (odd) and 1 + 2^-9 (even): -> up.
  EXPECT_EQ(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)).bits, 0x3c02u);
  // Subnormal ties: 2^-25 (between 0 and 2^-24) -> 0; 3 * 2^-25 (between 1 and 2 units) -> 2.
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)).bits, 0x0000u);
  EXPECT_EQ(float_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)).bits, 0x0001u);
  EXPECT_EQ(float_to_f16(3 * std::ldexp(1.0f, -25)).bits, 0x0002u);
  EXPECT_EQ(float_to_f16(5 * std::ldexp(1.0f, -25)).bits, 0x0002u);
  // Rounding the largest subnormal up carries into the smallest normal.
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -26)).bits, 0x0400u);
}

// Every f16 value, every midpoint between neighbours, and one f32 ulp on each side of both,
// for both signs, against the compiler.
TEST(F16, EveryBoundaryAndMidpointMatchesCompiler) {
  int checked = 0;
  for (uint32_t h = 0; h < 0x7c00u; ++h) {
    const double lo = gcc_f16_value(static_cast<uint16_t>(h));
    const double hi = (h + 1 == 0x7c00u) ? 65536.0 : gcc_f16_value(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((lo + hi) / 2);  // 12 significant bits: exact in f32
    ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);
    const float value = static_cast<float>(lo);
    for (float x : {value, std::nextafter(value, INFINITY), std::nextafter(value, -INFINITY), mid,
                    std::nextafter(mid, INFINITY), std::nextafter(mid, -INFINITY)}) {
      for (float s : {x, -x}) {
        ASSERT_EQ(float_to_f16(s).bits, gcc_f16_bits(s))
            << "x=" << s << " bits=" << std::hex << float_bits(s);
        ++checked;
      }
    }
    // The midpoint itself goes to the even neighbour.
    const uint32_t even = (h & 1u) ? h + 1 : h;
    ASSERT_EQ(float_to_f16(mid).bits, even) << "midpoint above f16 " << std::hex << h;
  }
  EXPECT_GT(checked, 6 * 2 * 0x7000);
}

// All f32 magnitudes whose top 18 bits (what f16 can keep) take every value, combined with the
// low-13-bit patterns that matter for rounding (exact, just above, just below and at half, max).
TEST(F16, AllHighBitPatternsWithCriticalLowBitsMatchCompiler) {
  std::mt19937 rng(7);
  const uint32_t lows[] = {0x0000u, 0x0001u, 0x0fffu, 0x1000u, 0x1001u, 0x1fffu};
  for (uint32_t top = 0; top < (1u << 18); ++top) {
    const uint32_t base = top << 13;
    if ((base & 0x7f800000u) == 0x7f800000u) continue;  // inf/NaN: checked elsewhere
    for (uint32_t low : lows) {
      const uint32_t u = base | low;
      ASSERT_EQ(float_to_f16(from_bits(u)).bits, gcc_f16_bits(from_bits(u))) << std::hex << u;
    }
    const uint32_t r = (base | (rng() & 0x1fffu)) | 0x80000000u;
    ASSERT_EQ(float_to_f16(from_bits(r)).bits, gcc_f16_bits(from_bits(r))) << std::hex << r;
  }
}

TEST(F16, SubnormalRangeMatchesCompiler) {
  // Every f32 from 2^-26 up to 2^-14 with a stride that hits all dropped-bit patterns' classes.
  for (uint32_t u = 0x32800000u; u <= 0x38800000u; u += 101) {
    ASSERT_EQ(float_to_f16(from_bits(u)).bits, gcc_f16_bits(from_bits(u))) << std::hex << u;
    ASSERT_EQ(float_to_f16(from_bits(u | 0x80000000u)).bits,
              gcc_f16_bits(from_bits(u | 0x80000000u)))
        << std::hex << u;
  }
}

TEST(F16, RandomBitPatternsMatchCompiler) {
  std::mt19937 rng(12345);
  for (int i = 0; i < 2000000; ++i) {
    const uint32_t u = rng();
    const float f = from_bits(u);
    const uint16_t got = float_to_f16(f).bits;
    const uint16_t want = gcc_f16_bits(f);
    if (std::isnan(f)) {
      ASSERT_TRUE(f16_is_nan(got)) << std::hex << u;
      ASSERT_EQ(got & 0x8000u, want & 0x8000u) << std::hex << u;
    } else {
      ASSERT_EQ(got, want) << std::hex << u;
    }
  }
  // Random values concentrated in and around the f16 range (exponents 2^-30 .. 2^20).
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t exp = 97u + rng() % 51u;
    const uint32_t u = (rng() & 0x80000000u) | (exp << 23) | (rng() & 0x7fffffu);
    ASSERT_EQ(float_to_f16(from_bits(u)).bits, gcc_f16_bits(from_bits(u))) << std::hex << u;
  }
}

// ---------------------------------------------------------------------------------------------
// bf16

TEST(BF16, ReferenceSelfCheck) {
  // The reference must itself get the textbook cases right, or the comparisons mean nothing.
  EXPECT_EQ(ref_bf16_bits(1.0f), 0x3f80u);
  EXPECT_EQ(ref_bf16_bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80u);      // tie -> even
  EXPECT_EQ(ref_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82u);  // tie -> even (up)
  EXPECT_EQ(ref_bf16_bits(-FLT_MAX), 0xff80u);
  EXPECT_EQ(ref_bf16_bits(from_bits(0x00000001u)), 0x0000u);
}

TEST(BF16, EveryPatternWidensExactly) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float got = bf16_to_float(BF16{bits});
    if (bf16_is_nan(bits)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << b;
      continue;
    }
    const double mag = (b & 0x7fffu) == 0x7f80u ? INFINITY : bf16_mag_value(b & 0x7fffu);
    const double want = (b & 0x8000u) ? -mag : mag;
    ASSERT_EQ(static_cast<double>(got), want) << std::hex << b;
    ASSERT_EQ(std::signbit(got), (b & 0x8000u) != 0) << std::hex << b;
  }
}

TEST(BF16, EveryPatternRoundTripsBitExactlyAndNanStaysNan) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const uint16_t back = float_to_bf16(bf16_to_float(BF16{bits})).bits;
    if (bf16_is_nan(bits)) {
      ASSERT_TRUE(bf16_is_nan(back)) << std::hex << b << " -> " << back;
      ASSERT_EQ(back & 0x8000u, b & 0x8000u);
      ASSERT_TRUE(back & 0x40u) << "NaN must come back quiet: " << std::hex << back;
    } else {
      ASSERT_EQ(back, bits) << std::hex << b;
    }
  }
}

TEST(BF16, NanIsQuietAndKeepsSign) {
  // Signalling NaNs whose payload lives only in the dropped low bits must not become inf.
  for (uint32_t u :
       {0x7f800001u, 0x7f80ffffu, 0x7fc00000u, 0x7fffffffu, 0xff800001u, 0xffc00000u}) {
    const uint16_t got = float_to_bf16(from_bits(u)).bits;
    EXPECT_TRUE(bf16_is_nan(got)) << std::hex << u << " -> " << got;
    EXPECT_TRUE(got & 0x40u) << std::hex << u << " -> " << got;
    EXPECT_EQ(got & 0x8000u, (u >> 16) & 0x8000u);
  }
}

TEST(BF16, InfinityAndOverflowNearFltMax) {
  EXPECT_EQ(float_to_bf16(INFINITY).bits, 0x7f80u);
  EXPECT_EQ(float_to_bf16(-INFINITY).bits, 0xff80u);
  // Largest bf16 is 0x7f7f0000; the midpoint to "2^128" is 0x7f7f8000.
  EXPECT_EQ(float_to_bf16(FLT_MAX).bits, 0x7f80u);
  EXPECT_EQ(float_to_bf16(-FLT_MAX).bits, 0xff80u);
  EXPECT_EQ(float_to_bf16(from_bits(0x7f7f8000u)).bits, 0x7f80u);  // tie, odd below -> inf
  EXPECT_EQ(float_to_bf16(from_bits(0x7f7f7fffu)).bits, 0x7f7fu);
  EXPECT_EQ(float_to_bf16(from_bits(0x7f7f0000u)).bits, 0x7f7fu);
}

TEST(BF16, TiesGoToEven) {
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808000u)).bits, 0x3f80u);  // even below: down
  EXPECT_EQ(float_to_bf16(from_bits(0x3f818000u)).bits, 0x3f82u);  // odd below: up
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808001u)).bits, 0x3f81u);  // above the tie: up
  EXPECT_EQ(float_to_bf16(from_bits(0x3f817fffu)).bits, 0x3f81u);  // below the tie: down
  EXPECT_EQ(float_to_bf16(from_bits(0x00008000u)).bits, 0x0000u);  // subnormal tie
  EXPECT_EQ(float_to_bf16(from_bits(0x00018000u)).bits, 0x0002u);
  EXPECT_EQ(float_to_bf16(from_bits(0x807fffffu)).bits, 0x8080u);  // carry into exponent
}

TEST(BF16, EveryBoundaryAndMidpointMatchesReference) {
  for (uint32_t h = 0; h < 0x7f80u; ++h) {
    const uint32_t base = h << 16;
    for (uint32_t low : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      for (uint32_t sign : {0u, 0x80000000u}) {
        const float x = from_bits(sign | base | low);
        ASSERT_EQ(float_to_bf16(x).bits, ref_bf16_bits(x)) << std::hex << (sign | base | low);
      }
    }
  }
}

TEST(BF16, RandomBitPatternsMatchReference) {
  std::mt19937 rng(999);
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t u = rng();
    const float f = from_bits(u);
    const uint16_t got = float_to_bf16(f).bits;
    if (std::isnan(f)) {
      ASSERT_TRUE(bf16_is_nan(got)) << std::hex << u;
    } else {
      ASSERT_EQ(got, ref_bf16_bits(f)) << std::hex << u;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// load/store and convert

// The correctly rounded pattern of f in dtype dst, from the independent references.
uint32_t ref_store(DType dst, float f) {
  switch (dst) {
    case DType::kBF16:
      return ref_bf16_bits(f);
    case DType::kF16:
      return gcc_f16_bits(f);
    default:
      return float_bits(f);
  }
}

std::vector<uint8_t> make_buffer(DType dtype, const std::vector<float>& values) {
  std::vector<uint8_t> buf(values.size() * dtype_size(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    const uint32_t bits = ref_store(dtype, values[i]);
    if (dtype == DType::kF32) {
      memcpy(&buf[i * 4], &bits, 4);
    } else {
      const uint16_t b16 = static_cast<uint16_t>(bits);
      memcpy(&buf[i * 2], &b16, 2);
    }
  }
  return buf;
}

float ref_load(DType dtype, const std::vector<uint8_t>& buf, size_t i) {
  if (dtype == DType::kF32) {
    float f;
    memcpy(&f, &buf[i * 4], 4);
    return f;
  }
  uint16_t b;
  memcpy(&b, &buf[i * 2], 2);
  if (dtype == DType::kF16) return gcc_f16_value(b);
  const double mag = (b & 0x7fffu) == 0x7f80u ? INFINITY : bf16_mag_value(b & 0x7fffu);
  return static_cast<float>((b & 0x8000u) ? -mag : mag);
}

uint32_t load_bits(DType dtype, const std::vector<uint8_t>& buf, size_t i) {
  if (dtype == DType::kF32) {
    uint32_t u;
    memcpy(&u, &buf[i * 4], 4);
    return u;
  }
  uint16_t b;
  memcpy(&b, &buf[i * 2], 2);
  return b;
}

TEST(Convert, AllDtypePairsRoundCorrectly) {
  // Values that are exact everywhere, values that need rounding between the 16-bit formats
  // (1 + 2^-10 is f16 but not bf16; 1e5 and 1e-30 are bf16 but out of f16's range), ties.
  std::vector<float> values = {0.0f,
                               -0.0f,
                               1.0f,
                               -2.5f,
                               0.15625f,
                               3.0e-5f,
                               1.0f + 1.0f / 1024,
                               1.0f + 3.0f / 1024,
                               100000.0f,
                               -1.0e-30f,
                               65504.0f,
                               6.0e-8f,
                               3.14159265f,
                               -123.456f,
                               INFINITY,
                               -INFINITY,
                               65520.0f,
                               std::ldexp(1.0f, -24),
                               1.0e38f};
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 10.0f);
  for (int i = 0; i < 200; ++i) values.push_back(dist(rng));
  const DType all[] = {DType::kF32, DType::kBF16, DType::kF16};
  for (DType src : all) {
    const std::vector<uint8_t> in = make_buffer(src, values);
    for (DType dst : all) {
      std::vector<uint8_t> out(values.size() * dtype_size(dst), 0xab);
      convert(in.data(), src, out.data(), dst, static_cast<int64_t>(values.size()));
      for (size_t i = 0; i < values.size(); ++i) {
        const float widened = ref_load(src, in, i);  // exact
        ASSERT_EQ(load_bits(dst, out, i), ref_store(dst, widened))
            << dtype_name(src) << " -> " << dtype_name(dst) << " value " << values[i];
      }
    }
  }
}

TEST(Convert, NanSurvivesEveryPair) {
  const DType all[] = {DType::kF32, DType::kBF16, DType::kF16};
  const float nan_in[2] = {NAN, from_bits(0x7f800001u)};
  for (DType src : all) {
    std::vector<uint8_t> in(2 * dtype_size(src));
    for (int i = 0; i < 2; ++i) store_from_float(in.data(), src, i, nan_in[i]);
    for (DType dst : all) {
      std::vector<uint8_t> out(2 * dtype_size(dst));
      convert(in.data(), src, out.data(), dst, 2);
      for (int i = 0; i < 2; ++i) {
        EXPECT_TRUE(std::isnan(load_as_float(out.data(), dst, i)))
            << dtype_name(src) << " -> " << dtype_name(dst) << " #" << i;
      }
    }
  }
}

TEST(Convert, ZeroCountWritesNothing) {
  float src[1] = {1.0f};
  uint16_t dst[1] = {0x1234u};
  convert(src, DType::kF32, dst, DType::kBF16, 0);
  convert(src, DType::kF32, dst, DType::kF16, 0);
  EXPECT_EQ(dst[0], 0x1234u);
}

TEST(LoadStore, IndexesByElementSize) {
  float f[3] = {0, 0, 0};
  uint16_t b[3] = {0, 0, 0};
  uint16_t h[3] = {0, 0, 0};
  store_from_float(f, DType::kF32, 2, 1.5f);
  store_from_float(b, DType::kBF16, 2, 1.5f);
  store_from_float(h, DType::kF16, 2, 1.5f);
  EXPECT_EQ(f[2], 1.5f);
  EXPECT_EQ(b[2], 0x3fc0u);
  EXPECT_EQ(h[2], 0x3e00u);
  EXPECT_EQ(b[0] | b[1] | h[0] | h[1], 0u);
  EXPECT_EQ(load_as_float(f, DType::kF32, 2), 1.5f);
  EXPECT_EQ(load_as_float(b, DType::kBF16, 2), 1.5f);
  EXPECT_EQ(load_as_float(h, DType::kF16, 2), 1.5f);
  store_from_float(b, DType::kBF16, 1, 1.0f + 1.0f / 256);  // tie -> even (1.0)
  EXPECT_EQ(b[1], 0x3f80u);
}

// ---------------------------------------------------------------------------------------------
// dtype names

TEST(DTypeNames, SizesNamesAndParse) {
  EXPECT_EQ(dtype_size(DType::kF32), 4u);
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_EQ(dtype_size(DType::kF16), 2u);
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) EXPECT_EQ(parse_dtype(dtype_name(d)), d);
  EXPECT_STREQ(dtype_name(DType::kBF16), "bf16");
  EXPECT_EQ(parse_dtype("float16"), DType::kF16);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::kBF16);
  EXPECT_EQ(parse_dtype("float32"), DType::kF32);
}

TEST(DTypeNames, ParseRejectsUnknownNamingTheValue) {
  for (const char* bad : {"", "fp8", "F32", "f64", "bf16 ", "half"}) {
    try {
      parse_dtype(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_THAT(e.what(), HasSubstr(std::string("'") + bad + "'"));
    }
  }
}

TEST(DTypeNames, UnknownDtypeCodeIsUnsupported) {
  try {
    dtype_size(static_cast<DType>(9));
    ADD_FAILURE() << "dtype_size accepted code 9";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_THAT(e.what(), HasSubstr("9"));
  }
}

// ---------------------------------------------------------------------------------------------
// TensorView

TEST(TensorView, ContiguousStridesAndSizes) {
  std::vector<float> buf(2 * 3 * 4 * 5);
  const TensorView t(buf.data(), DType::kF32, {2, 3, 4, 5});
  EXPECT_EQ(t.ndim(), 4);
  EXPECT_EQ(t.stride(0), 60);
  EXPECT_EQ(t.stride(1), 20);
  EXPECT_EQ(t.stride(2), 5);
  EXPECT_EQ(t.stride(3), 1);
  EXPECT_EQ(t.stride(-1), 1);
  EXPECT_EQ(t.size(-1), 5);
  EXPECT_EQ(t.size(-4), 2);
  EXPECT_EQ(t.numel(), 120);
  EXPECT_EQ(t.nbytes(), 480u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_TRUE(t.defined());
  const TensorView h(buf.data(), DType::kBF16, {2, 3, 4, 5});
  EXPECT_EQ(h.nbytes(), 240u);
}

TEST(TensorView, SliceOffsetsDataByStrideAndElementSize) {
  std::vector<uint16_t> buf(2 * 6 * 3 * 4);
  const TensorView t(buf.data(), DType::kF16, {2, 6, 3, 4});
  const TensorView s = t.slice(1, 2, 5);
  EXPECT_EQ(s.size(1), 3);
  EXPECT_EQ(s.stride(0), 72);  // strides kept
  EXPECT_EQ(s.stride(1), 12);
  EXPECT_EQ(static_cast<char*>(s.data()) - static_cast<char*>(t.data()), 2 * 12 * 2);
  EXPECT_FALSE(s.is_contiguous());  // a middle slice of a B=2 tensor has a gap
  EXPECT_EQ(s.numel(), 2 * 3 * 3 * 4);
  // Slicing the outermost dimension stays contiguous.
  const TensorView b = t.slice(0, 1, 2);
  EXPECT_TRUE(b.is_contiguous());
  EXPECT_EQ(b.data_as<uint16_t>(), buf.data() + 72);
  // Negative dim, nested slices accumulate offsets.
  const TensorView last = t.slice(-1, 1, 3).slice(-2, 2, 3);
  EXPECT_EQ(last.data_as<uint16_t>(), buf.data() + 1 + 2 * 4);
  EXPECT_EQ(last.size(3), 2);
  EXPECT_EQ(last.size(2), 1);
  // Empty slice at the end is allowed.
  EXPECT_EQ(t.slice(1, 6, 6).numel(), 0);
}

TEST(TensorView, SliceRejectsBadRanges) {
  std::vector<float> buf(12);
  const TensorView t(buf.data(), DType::kF32, {3, 4});
  EXPECT_THROW(t.slice(1, 0, 5), Error);
  EXPECT_THROW(t.slice(1, 3, 2), Error);
  EXPECT_THROW(t.slice(1, -1, 2), Error);
  EXPECT_THROW(t.slice(2, 0, 1), Error);
  EXPECT_THROW(t.slice(-3, 0, 1), Error);
  try {
    t.slice(0, 0, 4);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("size 3"));
  }
}

TEST(TensorView, IsContiguousWithExplicitStrides) {
  float buf[64];
  const int64_t shape[3] = {2, 3, 4};
  const int64_t dense[3] = {12, 4, 1};
  const int64_t transposed[3] = {12, 1, 3};
  const int64_t padded[3] = {16, 4, 1};
  EXPECT_TRUE(TensorView(buf, DType::kF32, 3, shape, dense).is_contiguous());
  EXPECT_FALSE(TensorView(buf, DType::kF32, 3, shape, transposed).is_contiguous());
  EXPECT_FALSE(TensorView(buf, DType::kF32, 3, shape, padded).is_contiguous());
  // A size-1 dimension's stride does not matter.
  const int64_t shape1[3] = {2, 1, 4};
  const int64_t odd1[3] = {4, 999, 1};
  EXPECT_TRUE(TensorView(buf, DType::kF32, 3, shape1, odd1).is_contiguous());
  const TensorView v(buf, DType::kF32, 3, shape, transposed);
  EXPECT_EQ(v.stride(1), 1);
  EXPECT_EQ(v.stride(2), 3);
}

TEST(TensorView, NegativeDimsRejected) {
  float buf[4];
  EXPECT_THROW(TensorView(buf, DType::kF32, {2, -1}), Error);
  const int64_t shape[2] = {-3, 2};
  const int64_t strides[2] = {2, 1};
  try {
    TensorView(buf, DType::kF32, 2, shape, strides);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr("-3"));
  }
}

TEST(TensorView, TooManyDimsRejected) {
  float buf[1];
  EXPECT_THROW(TensorView(buf, DType::kF32, {1, 1, 1, 1, 1, 1, 1}), Error);
  const int64_t shape[7] = {1, 1, 1, 1, 1, 1, 1};
  EXPECT_THROW(TensorView(buf, DType::kF32, 7, shape, shape), Error);
  EXPECT_THROW(TensorView(buf, DType::kF32, -1, shape, shape), Error);
  EXPECT_NO_THROW(TensorView(buf, DType::kF32, {1, 1, 1, 1, 1, 1}));
}

TEST(TensorView, Describe) {
  std::vector<float> buf(2 * 128 * 8 * 64);
  EXPECT_EQ(TensorView(buf.data(), DType::kBF16, {2, 128, 8, 64}).describe(),
            "[2, 128, 8, 64] bf16");
  EXPECT_EQ(TensorView(buf.data(), DType::kF32, {5}).describe(), "[5] f32");
  EXPECT_EQ(TensorView(buf.data(), DType::kF16, {}).describe(), "[] f16");
  EXPECT_EQ(TensorView(buf.data(), DType::kF16, {3, 0}, Device::kCUDA, 2).describe(),
            "[3, 0] f16 cuda:2");
}

TEST(TensorView, DefaultAndEmptyViews) {
  const TensorView d;
  EXPECT_EQ(d.ndim(), 0);
  EXPECT_EQ(d.data(), nullptr);
  const TensorView empty(nullptr, DType::kF32, {4, 0, 2});
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_TRUE(empty.defined());
  const TensorView missing(nullptr, DType::kF32, {4, 1, 2});
  EXPECT_FALSE(missing.defined());
  EXPECT_EQ(empty.slice(0, 1, 3).data(), nullptr);  // no arithmetic on a null pointer
}

}  // namespace
}  // namespace ringattn
