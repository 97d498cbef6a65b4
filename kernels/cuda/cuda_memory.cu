#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_memory.h"
#include "ringattn/memory.h"

namespace ringattn::cuda {

void set_device(int device) { RINGATTN_CUDA_CHECK(cudaSetDevice(device)); }

int current_device() {
  int d = 0;
  RINGATTN_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

void check_last_error(const char* what) {
  const cudaError_t rc = cudaGetLastError();
  RINGATTN_CHECK_CODE(ErrorCode::kCuda, rc == cudaSuccess, what, ": ", cudaGetErrorString(rc));
}

void* device_alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  const cudaError_t rc = cudaMalloc(&p, bytes);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    RINGATTN_THROW(ErrorCode::kCuda, "cudaMalloc of ", bytes, " bytes failed (",
                   cudaGetErrorString(rc), "; ", free_b, " of ", total_b, " bytes free)");
  }
  detail::account_alloc(Device::kCUDA, bytes);
  return p;
}

void device_free(void* ptr, size_t bytes) noexcept {
  if (ptr == nullptr) return;
  (void)cudaFree(ptr);
  detail::account_free(Device::kCUDA, bytes);
}

Stream::Stream() { RINGATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
Stream::~Stream() {
  if (s_ != nullptr) (void)cudaStreamDestroy(s_);
}
void Stream::synchronize() const { RINGATTN_CUDA_CHECK(cudaStreamSynchronize(s_)); }

Event::Event() { RINGATTN_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming)); }
Event::~Event() {
  if (e_ != nullptr) (void)cudaEventDestroy(e_);
}
void Event::record(cudaStream_t stream) { RINGATTN_CUDA_CHECK(cudaEventRecord(e_, stream)); }
void Event::wait_on(cudaStream_t stream) const {
  RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(stream, e_, 0));
}
void Event::synchronize() const { RINGATTN_CUDA_CHECK(cudaEventSynchronize(e_)); }
bool Event::query() const {
  const cudaError_t rc = cudaEventQuery(e_);
  if (rc == cudaErrorNotReady) return false;
  RINGATTN_CUDA_CHECK(rc);
  return true;
}

void copy_async(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  RINGATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
}

void copy_2d_async(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                   size_t height, cudaStream_t stream) {
  if (width == 0 || height == 0) return;
  RINGATTN_CUDA_CHECK(
      cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDefault, stream));
}

void copy_sync(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  RINGATTN_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

void memset_async(void* dst, int value, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  RINGATTN_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, stream));
}

namespace {
// Source row pitch in bytes; a single row may have any stride (cudaMemcpy2D wants pitch >= width).
size_t pitch(const TensorView& t, size_t es, size_t width, int64_t rows) {
  const size_t p = static_cast<size_t>(t.stride(1)) * es;
  return rows <= 1 && p < width ? width : p;
}
}  // namespace

void copy_tokens_async(const TensorView& src, int64_t lo, int64_t hi, void* dst,
                       cudaStream_t stream) {
  RINGATTN_CHECK(src.ndim() == 4, "copy_tokens_async needs a [B, N, H, D] tensor, got ",
                 src.describe());
  RINGATTN_CHECK(0 <= lo && lo <= hi && hi <= src.size(1), "copy_tokens_async: tokens [", lo, ", ",
                 hi, ") outside ", src.describe());
  const int64_t batch = src.size(0), heads = src.size(2), d = src.size(3);
  const size_t es = dtype_size(src.dtype());
  const size_t row = static_cast<size_t>(d) * es;
  const int64_t n = hi - lo;
  char* out = static_cast<char*>(dst);
  const char* base = static_cast<const char*>(src.data());
  for (int64_t b = 0; b < batch; ++b) {
    if (heads == 1 || src.stride(2) == d) {
      // All heads of a token are one run of heads * row bytes; tokens are stride(1) apart.
      const char* from = base + (b * src.stride(0) + lo * src.stride(1)) * es;
      copy_2d_async(out, row * heads, from, pitch(src, es, row * heads, n), row * heads,
                    static_cast<size_t>(n), stream);
      out += row * heads * n;
    } else {
      // One 2D copy per head: its rows land every heads * row bytes in dst.
      for (int64_t h = 0; h < heads; ++h) {
        const char* from = base + (b * src.stride(0) + lo * src.stride(1) + h * src.stride(2)) * es;
        copy_2d_async(out + h * row, row * heads, from, pitch(src, es, row, n), row,
                      static_cast<size_t>(n), stream);
      }
      out += row * heads * n;
    }
  }
}

}  // namespace ringattn::cuda
