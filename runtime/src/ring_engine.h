#pragma once
// The compute side of the ring, behind one interface so the same ring loop (ring_attention.cc,
// ring_backward.cc) runs on the CPU kernels over host buffers or on the CUDA kernels over
// device buffers. The ring decides WHAT to fold and send; the engine owns WHERE the bytes live
// and how a block is folded. Internal to the runtime.
//
// Ordering contract (CUDA): fold/add/zero/store calls are queued on the engine's compute stream
// and return at once; sync() waits for them. pack() returns only when the packed bytes are in
// the send buffer, so a transport may read them at once. The ring calls sync() at the end of
// every step, before a buffer that a queued fold may still read is refilled by a receive.

#include <cstdint>
#include <memory>

#include "comm/communicator.h"
#include "kernels/cpu/attention_cpu.h"
#include "ringattn/attention.h"
#include "ringattn/config.h"
#include "ringattn/memory.h"
#include "ringattn/tensor.h"
#if RINGATTN_WITH_CUDA
#include "kernels/cuda/cuda_memory.h"
#endif

namespace ringattn::detail {

/// Bytes on one device: a HostVector (accounted under kCPU) or a CUDA allocation (accounted under
/// kCUDA). resize() keeps the contents on the host only.
class ByteBuffer {
 public:
  ByteBuffer(Device device = Device::kCPU) : device_(device) {}  // NOLINT: aggregate init
  void resize(size_t bytes);
  char* data();
  size_t size() const;
  template <typename T>
  T* as() {
    return reinterpret_cast<T*>(data());
  }
  Device device() const { return device_; }

 private:
  Device device_;
  HostVector<char> host_;
#if RINGATTN_WITH_CUDA
  cuda::DeviceBuffer dev_;
#endif
};

/// One rank's compute: the forward state or the backward state of its queries, and the folds.
class RingEngine {
 public:
  virtual ~RingEngine() = default;
  virtual Device device() const = 0;
  ByteBuffer buffer(size_t bytes) {
    ByteBuffer b(device());
    b.resize(bytes);
    return b;
  }

  /// Copies tokens [lo, hi) (origin-local indices inside src's range) of a block's k then v into
  /// dst as [B, n, H_kv, D] each (BlockCodec::view's layout). Done when it returns.
  virtual void pack(const TensorView& k, const TensorView& v, int64_t lo, int64_t hi,
                    char* dst) = 0;
  /// Waits for queued compute.
  virtual void sync() = 0;

  // ---- forward ----
  /// Sizes and empties the forward state for queries at q_pos (host, [Nq]) of this shape.
  virtual void begin_forward(int64_t batch, int64_t q_len, int64_t heads, int64_t head_dim,
                             const int64_t* q_pos) = 0;
  /// Folds k, v (keys at host positions k_pos) into the state.
  virtual cpu::FoldStats fold(const AttentionSpec& spec, const TensorView& q, const TensorView& k,
                              const TensorView& v, const int64_t* k_pos) = 0;
  virtual void finalize(const TensorView* sink_logits, const TensorView& o,
                        const TensorView* lse) = 0;

  // ---- backward ----
  /// Sizes the backward state: lse copied, Delta = rowsum(dout * o), dq = 0.
  virtual void begin_backward(const TensorView& o, const TensorView& dout, const TensorView& lse,
                              const int64_t* q_pos) = 0;
  /// dq += ..., dk/dv (f32 accumulators on this engine's device) += ... for one block.
  virtual cpu::FoldStats fold_backward(const AttentionSpec& spec, const TensorView& q,
                                       const TensorView& k, const TensorView& v,
                                       const int64_t* k_pos, const TensorView& dout,
                                       const TensorView& dk, const TensorView& dv) = 0;
  /// dst[0, n) = 0 (f32, this engine's device).
  virtual void zero(float* dst, size_t n) = 0;
  /// dst += src for two f32 [B, N, H, D] views of one shape on this engine's device.
  virtual void add(const TensorView& dst, const TensorView& src) = 0;
  /// dsink (H floats on this engine's device) -= sum exp(z - lse) * Delta over this rank's rows.
  virtual void sink_logits_backward(const TensorView& sink_logits, float* dsink) = 0;
  /// dq (any dtype, q's shape) from the backward state.
  virtual void finalize_backward(const TensorView& dq) = 0;
  /// out (any dtype, strided) = acc ([B, N, H, D] f32 contiguous on this engine's device).
  virtual void store(const float* acc, const TensorView& out) = 0;
  /// Copies n bytes between this engine's memory and the host or device memory of a tensor.
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;

  // ---- decode (the KV cache, runtime/src/kv_cache.cc) ----
  /// Sizes, once, every buffer that forward calls of up to max_q_len queries folding blocks of
  /// up to max_keys keys (and merge_state) need: the forward state, the merge buffer, the
  /// positions (and on CUDA the kernels' per-thread tile scratch). From then on begin_forward,
  /// fold and merge_state within those bounds allocate nothing. Returns decode_bytes().
  virtual size_t reserve_decode(int64_t batch, int64_t max_q_len, int64_t heads, int64_t head_dim,
                                int64_t max_keys) = 0;
  /// Bytes of the buffers reserve_decode sized, on this engine's device (the kernels' shared
  /// per-thread scratch excluded): f32 m, l, acc and the merge buffer (m, sums, acc) of
  /// R = batch * heads * max_q_len rows, plus on CUDA the device copies of the query and key
  /// positions (max_q_len and max_keys int64). See decode_bytes_for.
  virtual size_t decode_bytes() const = 0;
  /// Merges the forward state exactly across the ranks of comm (all of them call it): M = MAX
  /// allreduce of m; l and acc rescaled by exp(m - M) (0 for an empty row); SUM allreduce of
  /// both. The merged state is what finalize then reads. Blocking; comm must accept buffers on
  /// this engine's device.
  virtual void merge_state(Communicator& comm) = 0;
  /// Copies tokens [lo, hi) of src ([B, N, H_kv, D], host or device, innermost dimension
  /// contiguous) into slots [slot, slot + hi - lo) of dst, a contiguous [B, cap, H_kv, D]
  /// buffer on this engine's device. CUDA: queued on the compute stream (sync() waits).
  virtual void store_tokens(const TensorView& src, int64_t lo, int64_t hi, char* dst, int64_t cap,
                            int64_t slot) = 0;
};

/// decode_bytes() after reserve_decode(batch, max_q_len, heads, head_dim, max_keys) on an
/// engine for `device` (the memory planner's figure; needs no engine).
size_t decode_bytes_for(Device device, int64_t batch, int64_t max_q_len, int64_t heads,
                        int64_t head_dim, int64_t max_keys);

/// The decode merge on host buffers (CpuEngine::merge_state; the CPU KV cache): state's rows
/// merged across comm's ranks; scratch holds R * (2 + D) floats (R = B * H * Nq of the state).
void merge_state_cpu(Communicator& comm, cpu::SoftmaxStateCpu& state, float* scratch);

/// The engine for tensors on `device`: the CPU kernels with num_threads threads (0: default), or
/// the CUDA kernels on the calling thread's current device. Throws Error(kUnsupported) for CUDA
/// in a build without it.
std::unique_ptr<RingEngine> make_engine(Device device, int num_threads);

}  // namespace ringattn::detail
