// The decode merge of the KV cache (runtime/src/kv_cache.cc) on a GPU: after the MAX allreduce
// of the running maxima, every rank rescales its partial softmax state to the global maxima
// (the arithmetic of the CPU merge, kernels/softmax_state.h rescale_factor) before the SUM
// allreduce of the sums and accumulators.

#include <cuda_runtime.h>

#include <limits>

#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/softmax_state.h"

namespace ringattn::cuda {
namespace {

// One thread per accumulator element: e = ((b * T + t) * H + h) * D + x; the state row of
// (b, h, t) is (b * H + h) * T + t. The x = 0 thread of a row also writes its sum.
__global__ void rescale_kernel(const float* m, const float* l, const float* acc, const float* mx,
                               float* sums, float* acc_out, int64_t q_len, int64_t heads,
                               int64_t head_dim, int64_t count) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= count) return;
  const int64_t x = e % head_dim;
  const int64_t r = e / head_dim;  // (b * T + t) * H + h
  const int64_t h = r % heads;
  const int64_t bt = r / heads;
  const int64_t t = bt % q_len, b = bt / q_len;
  const int64_t row = (b * heads + h) * q_len + t;
  const float f = rescale_factor(m[row], mx[row]);
  acc_out[e] = acc[e] * f;
  if (x == 0) sums[row] = l[row] * f;
}

}  // namespace

void rescale_state(const ForwardState& st, const float* mx, float* sums, float* acc_out,
                   cudaStream_t stream) {
  const int64_t count = st.batch * st.q_len * st.heads * st.head_dim;
  if (count == 0) return;
  RINGATTN_CHECK(st.m != nullptr && st.l != nullptr && st.acc != nullptr && mx != nullptr &&
                     sums != nullptr && acc_out != nullptr,
                 "rescale_state: null buffer");
  constexpr int kThreads = 256;
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  RINGATTN_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "rescale_state: ", count,
                 " elements exceed the CUDA grid limit");
  rescale_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      st.m, st.l, st.acc, mx, sums, acc_out, st.q_len, st.heads, st.head_dim, count);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ringattn::cuda
