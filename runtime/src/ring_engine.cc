#include "runtime/src/ring_engine.h"

#include <algorithm>
#include <cstring>

#include "kernels/cpu/attention_cpu_bwd.h"
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

 private:
  int threads_;
  const int64_t* q_pos_ = nullptr;
  cpu::SoftmaxStateCpu state_;
  cpu::BackwardStateCpu bstate_;
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
    ml_.resize(static_cast<size_t>(2 * rows) * sizeof(float));
    acc_.resize(static_cast<size_t>(rows * head_dim) * sizeof(float));
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
    q_pos_dev_.resize(static_cast<size_t>(n) * sizeof(int64_t));
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
  cuda::DeviceBuffer q_pos_dev_, k_pos_dev_, ml_, acc_;
  cuda::ForwardState st_;
  cuda::BackwardState bst_;
};

#endif  // RINGATTN_WITH_CUDA

}  // namespace

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
