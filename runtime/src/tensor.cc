#include "ringattn/tensor.h"

#include <sstream>

namespace ringattn {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
  }
  RINGATTN_THROW(ErrorCode::kUnsupported, "unknown dtype code ", static_cast<int>(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "f16";
  }
  return "unknown";
}

DType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "float32") return DType::kF32;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "f16" || name == "float16") return DType::kF16;
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "unknown dtype '", name,
                 "': expected f32, bf16 or f16");
}

const char* device_name(Device device) { return device == Device::kCUDA ? "cuda" : "cpu"; }

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  if (src_dtype == dst_dtype) {
    memcpy(dst, src, static_cast<size_t>(n) * dtype_size(src_dtype));
    return;
  }
  if (dst_dtype == DType::kF32) {
    float* d = static_cast<float*>(dst);
    if (src_dtype == DType::kBF16) {
      const BF16* s = static_cast<const BF16*>(src);
      for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_float(s[i]);
    } else {
      const F16* s = static_cast<const F16*>(src);
      for (int64_t i = 0; i < n; ++i) d[i] = f16_to_float(s[i]);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    store_from_float(dst, dst_dtype, i, load_as_float(src, src_dtype, i));
}

TensorView::TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device,
                       int device_index)
    : data_(data), dtype_(dtype), device_(device), device_index_(device_index) {
  RINGATTN_CHECK(static_cast<int>(shape.size()) <= kMaxDims, "tensor rank ", shape.size(),
                 " exceeds the maximum of ", kMaxDims);
  ndim_ = static_cast<int>(shape.size());
  int d = 0;
  for (int64_t s : shape) {
    RINGATTN_CHECK(s >= 0, "negative dimension ", s, " in tensor shape");
    shape_[d++] = s;
  }
  int64_t stride = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    strides_[i] = stride;
    stride *= shape_[i];
  }
}

TensorView::TensorView(void* data, DType dtype, int ndim, const int64_t* shape,
                       const int64_t* strides, Device device, int device_index)
    : data_(data), dtype_(dtype), device_(device), device_index_(device_index), ndim_(ndim) {
  RINGATTN_CHECK(ndim >= 0 && ndim <= kMaxDims, "tensor rank ", ndim, " outside 0..", kMaxDims);
  for (int i = 0; i < ndim; ++i) {
    RINGATTN_CHECK(shape[i] >= 0, "negative dimension ", shape[i], " in tensor shape");
    shape_[i] = shape[i];
    strides_[i] = strides[i];
  }
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= shape_[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

std::string TensorView::describe() const {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < ndim_; ++i) os << (i ? ", " : "") << shape_[i];
  os << "] " << dtype_name(dtype_);
  if (device_ == Device::kCUDA) os << " cuda:" << device_index_;
  return os.str();
}

TensorView TensorView::slice(int dim, int64_t begin, int64_t end) const {
  if (dim < 0) dim += ndim_;
  RINGATTN_CHECK(dim >= 0 && dim < ndim_, "slice dimension ", dim, " outside a rank-", ndim_,
                 " tensor");
  RINGATTN_CHECK(0 <= begin && begin <= end && end <= shape_[dim], "slice [", begin, ", ", end,
                 ") outside dimension ", dim, " of size ", shape_[dim]);
  TensorView v = *this;
  v.shape_[dim] = end - begin;
  if (data_ != nullptr) {
    v.data_ = static_cast<char*>(data_) +
              begin * strides_[dim] * static_cast<int64_t>(dtype_size(dtype_));
  }
  return v;
}

}  // namespace ringattn
