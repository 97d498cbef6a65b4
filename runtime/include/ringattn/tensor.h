#pragma once
/// Core tensor types: element types with exact conversions, devices, and the non-owning
/// TensorView every API takes. No CUDA, MPI or NCCL in this header.

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>

#include "ringattn/error.h"
#include "ringattn/macros.h"

namespace ringattn {

/// Element type of a tensor. Compute and accumulation are always f32.
enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

/// Bytes per element.
size_t dtype_size(DType dtype);
/// "f32", "bf16", "f16" (the spelling of the --dtype flag).
const char* dtype_name(DType dtype);
/// Parses "f32" | "bf16" | "f16"; throws Error naming the bad value otherwise.
DType parse_dtype(const std::string& name);

/// Where a tensor's memory lives.
enum class Device : uint8_t { kCPU = 0, kCUDA = 1 };
const char* device_name(Device device);

/// bfloat16 storage (the upper 16 bits of an IEEE f32).
struct BF16 {
  uint16_t bits;
};
/// IEEE half storage.
struct F16 {
  uint16_t bits;
};

RINGATTN_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
RINGATTN_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

/// f32 -> bf16, round to nearest even; NaN stays NaN (quiet), infinities stay infinite.
RINGATTN_HD BF16 float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>(u >> 16)};
}
/// bf16 -> f32 (exact).
RINGATTN_HD float bf16_to_float(BF16 h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

/// f32 -> f16, round to nearest even, with subnormals, overflow to infinity and NaN kept.
RINGATTN_HD F16 float_to_f16(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return F16{static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return F16{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero): value = a_float / 2^-24 rounded to an integer.
    if (a < 0x33000000u) return F16{sign};  // < 2^-25: rounds to zero
    const uint32_t exp = a >> 23;
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14 + (113 - exp) - 1 ... bits dropped
    // value in units of 2^-24 is mant * 2^(exp - 127 - 23 + 24) = mant >> (126 - exp)
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return F16{static_cast<uint16_t>(sign | r)};
  }
  // Normal: rebias exponent (127 -> 15) and round the 13 dropped mantissa bits.
  uint32_t v = a - 0x38000000u;
  v += 0xfffu + ((v >> 13) & 1u);
  return F16{static_cast<uint16_t>(sign | (v >> 13))};
}

/// f16 -> f32 (exact).
RINGATTN_HD float f16_to_float(F16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// Loads element i of a buffer of the given dtype as f32.
RINGATTN_HD float load_as_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBF16:
      return bf16_to_float(static_cast<const BF16*>(base)[i]);
    case DType::kF16:
      return f16_to_float(static_cast<const F16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}
/// Stores an f32 value as element i of a buffer of the given dtype (round to nearest even).
RINGATTN_HD void store_from_float(void* base, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kBF16:
      static_cast<BF16*>(base)[i] = float_to_bf16(v);
      break;
    case DType::kF16:
      static_cast<F16*>(base)[i] = float_to_f16(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
      break;
  }
}

/// Converts n contiguous elements between dtypes on the host (same dtype: memcpy).
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);

/// A non-owning view of a strided tensor: data pointer, dtype, device, shape and strides
/// (in elements). Up to kMaxDims dimensions. Copying a view never copies data.
class TensorView {
 public:
  static constexpr int kMaxDims = 6;

  TensorView() = default;
  /// A contiguous row-major view of `shape`.
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape,
             Device device = Device::kCPU, int device_index = 0);
  /// A view with explicit shape and strides (elements).
  TensorView(void* data, DType dtype, int ndim, const int64_t* shape, const int64_t* strides,
             Device device = Device::kCPU, int device_index = 0);

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int device_index() const { return device_index_; }
  int ndim() const { return ndim_; }
  int64_t size(int d) const { return shape_[d < 0 ? d + ndim_ : d]; }
  int64_t stride(int d) const { return strides_[d < 0 ? d + ndim_ : d]; }
  const int64_t* shape() const { return shape_.data(); }
  const int64_t* strides() const { return strides_.data(); }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool defined() const { return data_ != nullptr || numel() == 0; }
  bool is_contiguous() const;
  /// "[2, 128, 8, 64] bf16" for messages.
  std::string describe() const;

  /// View of indices [begin, end) along dimension dim (same strides, offset data).
  TensorView slice(int dim, int64_t begin, int64_t end) const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCPU;
  int device_index_ = 0;
  int ndim_ = 0;
  std::array<int64_t, kMaxDims> shape_{};
  std::array<int64_t, kMaxDims> strides_{};
};

}  // namespace ringattn
