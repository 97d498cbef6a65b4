#include "runtime/src/ring_engine.h"

#include <algorithm>
#include <cstring>

#include "kernels/cpu/attention_cpu_bwd.h"
#include "kernels/softmax_state.h"
#include "ringattn/error.h"
#if RINGATTN_WITH_CUDA
#include "kernels/cuda/attention_cuda.h"
#endif

namespace ringattn::detail {

void ByteBuffer::resize(size_t bytes) {
#if RINGATTN_WITH_CUDA
  if (device_ == Device::kCUDA) {
    dev_.resize(bytes);
    return;
  }
#endif
  host_.resize(bytes);
}

char* ByteBuffer::data() {
#if RINGATTN_WITH_CUDA
  if (device_ == Device::kCUDA) return dev_.as<char>();
#endif
  return host_.data();
}

size_t ByteBuffer::size() const {
#if RINGATTN_WITH_CUDA
  if (device_ == Device::kCUDA) return dev_.size();
#endif
  return host_.size();
}

namespace {

// out (any dtype, strided) = acc ([B, N, H, D] f32, contiguous), on the host.
void store_host(const float* acc, const TensorView& out) {
  const int64_t bsz = out.size(0), n = out.size(1), heads = out.size(2), d = out.size(3);
  for (int64_t b = 0; b < bsz; ++b) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* a = acc + ((b * n + i) * heads + h) * d;
        const int64_t off = b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
        for (int64_t c = 0; c < d; ++c) store_from_float(out.data(), out.dtype(), off + c, a[c]);
      }
    }
  }
}

// Tokens [lo, hi) of src [B, N, H_kv, D] into slots [slot, ...) of dst [B, cap, H_kv, D], host.
void store_tokens_host(const TensorView& src, int64_t lo, int64_t hi, char* dst, int64_t cap,
                       int64_t slot) {
  const size_t es = dtype_size(src.dtype());
  const int64_t kv_heads = src.size(2), d = src.size(3);
  const size_t row_bytes = static_cast<size_t>(kv_heads * d) * es;
  const char* base = static_cast<const char*>(src.data());
  for (int64_t b = 0; b < src.size(0); ++b) {
    for (int64_t i = lo; i < hi; ++i) {
      char* out = dst + static_cast<size_t>(b * cap + slot + (i - lo)) * row_bytes;
      const int64_t tok = b * src.stride(0) + i * src.stride(1);
      if (src.stride(2) == d) {  // all heads of a token are one run
        std::memcpy(out, base + tok * es, row_bytes);
      } else {
        for (int64_t h = 0; h < kv_heads; ++h) {
          std::memcpy(out + h * d * es, base + (tok + h * src.stride(2)) * es, d * es);
        }
      }
    }
  }
}

class CpuEngine final : public RingEngine {
 public:
  explicit CpuEngine(int num_threads) : threads_(num_threads) {}
  Device device() const override { return Device::kCPU; }

  void pack(const TensorView& k, const TensorView& v, int64_t lo, int64_t hi, char* dst) override {
    char* out = dst;
    for (const TensorView* t : {&k, &v}) {
      const int64_t batch = t->size(0), heads = t->size(2), d = t->size(3);
      const size_t es = dtype_size(t->dtype());
      const size_t row = static_cast<size_t>(d) * es;
      const char* base = static_cast<const char*>(t->data());
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t n = lo; n < hi; ++n) {
          if (t->stride(2) == d) {  // all heads of a token are one run
            std::memcpy(out, base + (b * t->stride(0) + n * t->stride(1)) * es, row * heads);
            out += row * heads;
          } else {
            for (int64_t h = 0; h < heads; ++h) {
              const int64_t off = b * t->stride(0) + n * t->stride(1) + h * t->stride(2);
              std::memcpy(out, base + off * es, row);
              out += row;
            }
          }
        }
      }
    }
  }
  void sync() override {}

  void begin_forward(int64_t batch, int64_t q_len, int64_t heads, int64_t head_dim,
                     const int64_t* q_pos) override {
    state_.reset(batch, q_len, heads, head_dim);
    q_pos_ = q_pos;
  }
  cpu::FoldStats fold(const AttentionSpec& spec, const TensorView& q, const TensorView& k,
                      const TensorView& v, const int64_t* k_pos) override {
    return cpu::fold_block(spec, q, q_pos_, k, v, k_pos, state_, threads_);
  }
  void finalize(const TensorView* sink_logits, const TensorView& o,
                const TensorView* lse) override {
    cpu::finalize(state_, sink_logits, o, lse);
  }

  void begin_backward(const TensorView& o, const TensorView& dout, const TensorView& lse,
                      const int64_t* q_pos) override {
    bstate_.begin(o, dout, lse);
    q_pos_ = q_pos;
  }
  cpu::FoldStats fold_backward(const AttentionSpec& spec, const TensorView& q, const TensorView& k,
                               const TensorView& v, const int64_t* k_pos, const TensorView& dout,
                               const TensorView& dk, const TensorView& dv) override {
    return cpu::fold_block_backward(spec, q, q_pos_, k, v, k_pos, dout, bstate_, dk, dv, threads_);
  }
  void zero(float* dst, size_t n) override { std::fill(dst, dst + n, 0.0f); }
  void add(const TensorView& dst, const TensorView& src) override {
    const int64_t bsz = dst.size(0), n = dst.size(1), heads = dst.size(2), d = dst.size(3);
    float* pd = dst.data_as<float>();
    const float* ps = src.data_as<const float>();
    for (int64_t b = 0; b < bsz; ++b) {
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t h = 0; h < heads; ++h) {
          float* x = pd + b * dst.stride(0) + i * dst.stride(1) + h * dst.stride(2);
          const float* y = ps + b * src.stride(0) + i * src.stride(1) + h * src.stride(2);
          for (int64_t c = 0; c < d; ++c) x[c] += y[c];
        }
      }
    }
  }
  void sink_logits_backward(const TensorView& sink_logits, float* dsink) override {
    cpu::sink_logits_backward(bstate_, sink_logits, dsink);
  }
  void finalize_backward(const TensorView& dq) override { cpu::finalize_backward(bstate_, dq); }
  void store(const float* acc, const TensorView& out) override { store_host(acc, out); }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }

  size_t reserve_decode(int64_t batch, int64_t max_q_len, int64_t heads, int64_t head_dim,
                        int64_t /*max_keys*/) override {
    state_.reset(batch, max_q_len, heads, head_dim);
    merge_.resize(static_cast<size_t>(batch * heads * max_q_len * (2 + head_dim)));
    return decode_bytes();
  }
  size_t decode_bytes() const override {
    return state_.nbytes() + merge_.capacity() * sizeof(float);
  }
  void merge_state(Communicator& comm) override {
    const size_t need = static_cast<size_t>(state_.batch() * state_.heads() * state_.q_len() *
                                            (2 + state_.head_dim()));
    if (merge_.size() < need) merge_.resize(need);
    merge_state_cpu(comm, state_, merge_.data());
  }
  void store_tokens(const TensorView& src, int64_t lo, int64_t hi, char* dst, int64_t cap,
                    int64_t slot) override {
    store_tokens_host(src, lo, hi, dst, cap, slot);
  }

 private:
  int threads_;
  const int64_t* q_pos_ = nullptr;
  cpu::SoftmaxStateCpu state_;
  cpu::BackwardStateCpu bstate_;
  HostVector<float> merge_;
};

#if RINGATTN_WITH_CUDA

// The CUDA kernels on one stream of the calling thread's device. Positions live on the host (the
// ring computes them) and are copied up per block; tile statistics are counted on the host from
// the same positions, after the kernel was queued.
class CudaEngine final : public RingEngine {
 public:
  CudaEngine() : choice_(cuda::kernel_choice_from_env()) {}
  Device device() const override { return Device::kCUDA; }

  void pack(const TensorView& k, const TensorView& v, int64_t lo, int64_t hi, char* dst) override {
    const size_t half =
        static_cast<size_t>(k.size(0) * (hi - lo) * k.size(2) * k.size(3)) * dtype_size(k.dtype());
    cuda::copy_tokens_async(k, lo, hi, dst, stream_.get());
    cuda::copy_tokens_async(v, lo, hi, dst + half, stream_.get());
    stream_.synchronize();
  }
  void sync() override { stream_.synchronize(); }

  void begin_forward(int64_t batch, int64_t q_len, int64_t heads, int64_t head_dim,
                     const int64_t* q_pos) override {
    upload_q_pos(q_pos, q_len);
    const int64_t rows = batch * heads * q_len;
    if (reserved_rows_ > 0) {
      // Decode: the buffers were sized once for the most rows (m and l at rows apart).
      RINGATTN_CHECK_CODE(ErrorCode::kInternal, rows <= reserved_rows_ && head_dim == reserved_d_,
                          "decode forward of ", rows, " rows exceeds the reserved ",
                          reserved_rows_);
    } else {
      ml_.resize(static_cast<size_t>(2 * rows) * sizeof(float));
      acc_.resize(static_cast<size_t>(rows * head_dim) * sizeof(float));
    }
    st_ = cuda::ForwardState{
        ml_.as<float>(), ml_.as<float>() + rows, acc_.as<float>(), batch, q_len, heads, head_dim};
    cuda::reset_state(st_, stream_.get());
  }
  cpu::FoldStats fold(const AttentionSpec& spec, const TensorView& q, const TensorView& k,
                      const TensorView& v, const int64_t* k_pos) override {
    const int64_t* kp = upload_k_pos(k_pos, k.size(1));
    cuda::fold_forward(spec, q, q_pos_dev_.as<int64_t>(), k, v, kp, st_, stream_.get(), choice_);
    return stats(spec, q, k_pos, k.size(1), 1.0);
  }
  void finalize(const TensorView* sink_logits, const TensorView& o,
                const TensorView* lse) override {
    float* lse_ptr = nullptr;
    if (lse != nullptr && lse->data() != nullptr) {
      RINGATTN_CHECK(
          lse->is_contiguous() && lse->dtype() == DType::kF32 && lse->device() == Device::kCUDA,
          "lse must be a contiguous [B, H, N] f32 CUDA tensor, got ", lse->describe());
      lse_ptr = lse->data_as<float>();
    }
    cuda::finalize_forward(st_, sink_ptr(sink_logits), o, lse_ptr, stream_.get());
    stream_.synchronize();
  }

  void begin_backward(const TensorView& o, const TensorView& dout, const TensorView& lse,
                      const int64_t* q_pos) override {
    const int64_t batch = o.size(0), q_len = o.size(1), heads = o.size(2), d = o.size(3);
    RINGATTN_CHECK(
        lse.is_contiguous() && lse.dtype() == DType::kF32 && lse.device() == Device::kCUDA,
        "lse must be a contiguous [B, H, N] f32 CUDA tensor, got ", lse.describe());
    upload_q_pos(q_pos, q_len);
    const int64_t rows = batch * heads * q_len;
    ml_.resize(static_cast<size_t>(rows) * sizeof(float));
    acc_.resize(static_cast<size_t>(rows * d) * sizeof(float));
    bst_ = cuda::BackwardState{
        lse.data_as<const float>(), ml_.as<float>(), acc_.as<float>(), batch, q_len, heads, d};
    cuda::backward_begin(o, dout, bst_, stream_.get());
  }
  cpu::FoldStats fold_backward(const AttentionSpec& spec, const TensorView& q, const TensorView& k,
                               const TensorView& v, const int64_t* k_pos, const TensorView& dout,
                               const TensorView& dk, const TensorView& dv) override {
    const int64_t* kp = upload_k_pos(k_pos, k.size(1));
    cuda::fold_backward(spec, q, q_pos_dev_.as<int64_t>(), k, v, kp, dout, bst_, dk, dv,
                        stream_.get(), choice_);
    return stats(spec, q, k_pos, k.size(1), 2.5);
  }
  void zero(float* dst, size_t n) override {
    cuda::memset_async(dst, 0, n * sizeof(float), stream_.get());
  }
  void add(const TensorView& dst, const TensorView& src) override {
    cuda::add_f32(dst, src, stream_.get());
  }
  void sink_logits_backward(const TensorView& sink_logits, float* dsink) override {
    cuda::sink_logits_backward(bst_, sink_ptr(&sink_logits), dsink, stream_.get());
  }
  void finalize_backward(const TensorView& dq) override {
    cuda::store_f32(bst_.dq, dq, stream_.get());
  }
  void store(const float* acc, const TensorView& out) override {
    cuda::store_f32(acc, out, stream_.get());
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    cuda::copy_async(dst, src, bytes, stream_.get());
    stream_.synchronize();
  }

  size_t reserve_decode(int64_t batch, int64_t max_q_len, int64_t heads, int64_t head_dim,
                        int64_t max_keys) override {
    const int64_t rows = batch * heads * max_q_len;
    reserved_rows_ = rows;
    reserved_d_ = head_dim;
    ml_.resize(static_cast<size_t>(2 * rows) * sizeof(float));
    acc_.resize(static_cast<size_t>(rows * head_dim) * sizeof(float));
    merge_.resize(static_cast<size_t>(rows * (2 + head_dim)) * sizeof(float));
    q_pos_dev_.resize(static_cast<size_t>(max_q_len) * sizeof(int64_t));
    k_pos_dev_.resize(static_cast<size_t>(max_keys) * sizeof(int64_t));
    cuda::reserve_fold_scratch(max_q_len, max_keys);
    return decode_bytes();
  }
  size_t decode_bytes() const override {
    return ml_.size() + acc_.size() + merge_.size() + q_pos_dev_.size() + k_pos_dev_.size();
  }
  void merge_state(Communicator& comm) override {
    const int64_t R = st_.batch * st_.heads * st_.q_len;
    const size_t need = static_cast<size_t>(R * (2 + st_.head_dim)) * sizeof(float);
    if (merge_.size() < need) {
      stream_.synchronize();
      merge_.resize(need);
    }
    float* mx = merge_.as<float>();
    float* sums = mx + R;
    float* acc = sums + R;
    cuda::copy_async(mx, st_.m, static_cast<size_t>(R) * sizeof(float), stream_.get());
    stream_.synchronize();
    comm.allreduce(mx, static_cast<size_t>(R), ReduceType::kF32, ReduceOp::kMax);
    cuda::rescale_state(st_, mx, sums, acc, stream_.get());
    stream_.synchronize();
    comm.allreduce(sums, static_cast<size_t>(R + R * st_.head_dim), ReduceType::kF32,
                   ReduceOp::kSum);
    // finalize reads the merged state.
    st_.m = mx;
    st_.l = sums;
    st_.acc = acc;
  }
  void store_tokens(const TensorView& src, int64_t lo, int64_t hi, char* dst, int64_t cap,
                    int64_t slot) override {
    if (hi <= lo) return;
    const size_t row_bytes =
        static_cast<size_t>(src.size(2) * src.size(3)) * dtype_size(src.dtype());
    for (int64_t b = 0; b < src.size(0); ++b) {
      cuda::copy_tokens_async(src.slice(0, b, b + 1), lo, hi,
                              dst + static_cast<size_t>(b * cap + slot) * row_bytes, stream_.get());
    }
  }

 private:
  const float* sink_ptr(const TensorView* sink_logits) const {
    if (sink_logits == nullptr || sink_logits->data() == nullptr) return nullptr;
    RINGATTN_CHECK(sink_logits->device() == Device::kCUDA && sink_logits->dtype() == DType::kF32 &&
                       sink_logits->is_contiguous(),
                   "sink_logits must be a contiguous [H] f32 CUDA tensor, got ",
                   sink_logits->describe());
    return sink_logits->data_as<const float>();
  }
  void upload_q_pos(const int64_t* q_pos, int64_t n) {
    q_pos_host_ = q_pos;
    const size_t bytes = static_cast<size_t>(n) * sizeof(int64_t);
    if (reserved_rows_ == 0 || q_pos_dev_.size() < bytes) q_pos_dev_.resize(bytes);
    cuda::copy_async(q_pos_dev_.data(), q_pos, static_cast<size_t>(n) * sizeof(int64_t),
                     stream_.get());
  }
  // Key positions go to a buffer that only grows (the ring reserves the largest block first),
  // queued behind the previous fold on the same stream.
  const int64_t* upload_k_pos(const int64_t* k_pos, int64_t n) {
    const size_t bytes = static_cast<size_t>(n) * sizeof(int64_t);
    if (k_pos_dev_.size() < bytes) {
      stream_.synchronize();
      k_pos_dev_.resize(bytes);
    }
    cuda::copy_async(k_pos_dev_.data(), k_pos, bytes, stream_.get());
    return k_pos_dev_.as<int64_t>();
  }
  cpu::FoldStats stats(const AttentionSpec& spec, const TensorView& q, const int64_t* k_pos,
                       int64_t k_len, double flop_factor) const {
    const cuda::TileCount tc = cuda::count_tiles(spec, q.dtype(), q.size(3), q.size(0), q.size(2),
                                                 q_pos_host_, q.size(1), k_pos, k_len);
    cpu::FoldStats fs;
    fs.tiles_computed = tc.computed;
    fs.tiles_skipped = tc.skipped;
    fs.flops = tc.flops * flop_factor;
    return fs;
  }

  cuda::Stream stream_;
  cuda::KernelChoice choice_;
  const int64_t* q_pos_host_ = nullptr;
  cuda::DeviceBuffer q_pos_dev_, k_pos_dev_, ml_, acc_, merge_;
  int64_t reserved_rows_ = 0, reserved_d_ = 0;  // reserve_decode's bounds (0: not reserved)
  cuda::ForwardState st_;
  cuda::BackwardState bst_;
};

#endif  // RINGATTN_WITH_CUDA

}  // namespace

void merge_state_cpu(Communicator& comm, cpu::SoftmaxStateCpu& state, float* scratch) {
  const int64_t B = state.batch(), H = state.heads(), T = state.q_len(), D = state.head_dim();
  const int64_t R = B * H * T;
  float* mx = scratch;
  float* sums = mx + R;
  float* acc = sums + R;
  std::copy(state.m(), state.m() + R, mx);
  comm.allreduce(mx, static_cast<size_t>(R), ReduceType::kF32, ReduceOp::kMax);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (b * H + h) * T + t;  // m, l are [B, H, T]
        const float f = rescale_factor(state.m()[row], mx[row]);
        sums[row] = state.l()[row] * f;
        const int64_t a = ((b * T + t) * H + h) * D;  // acc is [B, T, H, D]
        for (int64_t x = 0; x < D; ++x) acc[a + x] = state.acc()[a + x] * f;
      }
    }
  }
  comm.allreduce(sums, static_cast<size_t>(R + R * D), ReduceType::kF32, ReduceOp::kSum);
  std::copy(mx, mx + R, state.m());
  std::copy(sums, sums + R, state.l());
  std::copy(acc, acc + R * D, state.acc());
}

size_t decode_bytes_for(Device device, int64_t batch, int64_t max_q_len, int64_t heads,
                        int64_t head_dim, int64_t max_keys) {
  const size_t rows = static_cast<size_t>(batch * heads * max_q_len);
  const size_t d = static_cast<size_t>(head_dim);
  const size_t state = (2 * rows + rows * d) * sizeof(float);
  const size_t merge = rows * (2 + d) * sizeof(float);
  if (device == Device::kCPU) return state + merge;
  return state + merge +
         static_cast<size_t>(max_q_len + std::max<int64_t>(max_keys, 0)) * sizeof(int64_t);
}

std::unique_ptr<RingEngine> make_engine(Device device, int num_threads) {
  if (device == Device::kCPU) return std::make_unique<CpuEngine>(num_threads);
#if RINGATTN_WITH_CUDA
  return std::make_unique<CudaEngine>();
#else
  RINGATTN_THROW(ErrorCode::kUnsupported, "CUDA tensors need the CUDA backend, which this build ",
                 "does not provide (configure with RINGATTN_CUDA=ON)");
#endif
}

}  // namespace ringattn::detail
