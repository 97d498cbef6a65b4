// The C ABI (ringattn/ringattn.h) over the C++ API. Every entry point runs its body inside
// guarded(), which turns any exception into a status code and the thread's last-error message:
// nothing ever propagates across the extern "C" boundary.
//
// Argument checks of forward/backward run inside agree() over the call's communicator, so a bad
// argument on one rank is an error on every rank (the ring then agrees again on its own checks):
// one extra small allreduce per call buys "never a hang" for the ABI's checks too.

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>

#include "comm/inproc/inproc_communicator.h"
#include "comm/mpi/mpi_communicator.h"
#include "comm/mpi/mpi_session.h"
#include "ringattn/config.h"
#include "ringattn/ring.h"
#include "ringattn/ringattn.h"
#include "runtime/src/sharding.h"
#if RINGATTN_WITH_CUDA
#include "kernels/cuda/cuda_memory.h"
#endif
#if RINGATTN_WITH_NCCL
#include <cuda_runtime_api.h>

#include "comm/nccl/nccl_communicator.h"
#endif

struct ringattn_comm {
  std::unique_ptr<ringattn::InprocWorld> world;  // set for the one-rank "self" communicator
  std::unique_ptr<ringattn::Communicator> comm;
  int device = -1;  // the CUDA device of an "nccl" communicator's tensors; -1: host tensors
};

namespace ringattn {
namespace {

thread_local std::string g_last_error;

// The MPI session the ABI opened (null when the application initialised MPI, or before the
// first MPI communicator). Guarded by g_session_mutex.
std::mutex g_session_mutex;
std::unique_ptr<MpiSession> g_session;

void set_last_error(const char* message) noexcept {
  try {
    g_last_error = message;
  } catch (...) {
    g_last_error.clear();  // no memory for the message: leave it empty rather than throw
  }
}

template <typename Fn>
ringattn_status guarded(Fn&& body) noexcept {
  try {
    g_last_error.clear();
    body();
    return RINGATTN_OK;
  } catch (const Error& e) {
    set_last_error(e.what());
    return static_cast<ringattn_status>(static_cast<int>(e.code()));
  } catch (const std::bad_alloc&) {
    set_last_error("out of memory");
  } catch (const std::exception& e) {
    set_last_error(e.what());
  } catch (...) {
    set_last_error("unknown exception");
  }
  return RINGATTN_ERROR_INTERNAL;
}

Communicator& checked_comm(const ringattn_comm* c, const char* fn) {
  RINGATTN_CHECK(c != nullptr && c->comm != nullptr, fn, ": expected a communicator, found null");
  return *c->comm;
}

template <typename T>
void check_out(T* p, const char* fn, const char* name) {
  RINGATTN_CHECK(p != nullptr, fn, ": expected a non-null ", name, ", found null");
}

AttentionSpec to_spec(const ringattn_spec* s, const char* fn) {
  check_out(s, fn, "spec");
  RINGATTN_CHECK(s->layout >= RINGATTN_LAYOUT_AUTO && s->layout <= RINGATTN_LAYOUT_ZIGZAG, fn,
                 ": expected spec.layout 0 (auto), 1 (contiguous) or 2 (zigzag), found ",
                 s->layout);
  AttentionSpec spec;
  spec.causal = s->causal != 0;
  spec.window = s->window;
  spec.sinks = s->sinks;
  spec.scale = s->scale;
  spec.layout = static_cast<Layout>(s->layout);
  validate_spec(spec);
  return spec;
}

DType to_dtype(int dtype, const char* fn) {
  RINGATTN_CHECK(dtype >= RINGATTN_F32 && dtype <= RINGATTN_F16, fn,
                 ": expected dtype 0 (f32), 1 (bf16) or 2 (f16), found ", dtype);
  return static_cast<DType>(dtype);
}

// Where a communicator's tensors live: host memory, or device memory of one GPU.
struct Place {
  Device device = Device::kCPU;
  int index = 0;
};

Place place_of(const ringattn_comm* c) {
  return c->device >= 0 ? Place{Device::kCUDA, c->device} : Place{};
}

// Views of one rank's tensors over raw pointers, after checking the shape and the pointers.
struct Views {
  TensorView q, k, v, lse, sink;
  // Tensors shaped like q / like k (o, dout, dq; dk, dv).
  TensorView like_q(const void* p) const { return make(p, q_shape); }
  TensorView like_k(const void* p) const { return make(p, k_shape); }
  // An f32 tensor of `shape` (lse [B, H, N], dsink [H]).
  TensorView f32(const float* p, std::initializer_list<int64_t> shape) const {
    return TensorView(const_cast<float*>(p), DType::kF32, shape, place.device, place.index);
  }

  DType dtype = DType::kF32;
  Place place;
  int64_t q_shape[4] = {}, k_shape[4] = {};

  TensorView make(const void* p, const int64_t (&shape)[4]) const {
    return TensorView(const_cast<void*>(p), dtype, {shape[0], shape[1], shape[2], shape[3]},
                      place.device, place.index);
  }
};

Views make_views(const char* fn, Place place, const ringattn_shape* shape, int dtype, const void* q,
                 const void* k, const void* v, const float* lse, const float* sink_logits) {
  check_out(shape, fn, "shape");
  const int64_t dims[] = {shape->batch, shape->seq_local, shape->heads, shape->kv_heads,
                          shape->head_dim};
  const char* names[] = {"batch", "seq_local", "heads", "kv_heads", "head_dim"};
  for (int i = 0; i < 5; ++i) {
    RINGATTN_CHECK(dims[i] >= 0, fn, ": expected shape.", names[i], " >= 0, found ", dims[i]);
  }
  // q has the most elements (H >= H_kv is checked later); its byte count must fit in int64.
  int64_t bytes = 4;
  for (int64_t e :
       {shape->batch, shape->seq_local, std::max(shape->heads, shape->kv_heads), shape->head_dim}) {
    RINGATTN_CHECK(e == 0 || bytes <= std::numeric_limits<int64_t>::max() / e, fn,
                   ": shape too large (the byte count overflows int64)");
    bytes *= e == 0 ? 1 : e;
  }
  Views w;
  w.dtype = to_dtype(dtype, fn);
  w.place = place;
  const int64_t b = shape->batch, n = shape->seq_local, d = shape->head_dim;
  const int64_t qs[4] = {b, n, shape->heads, d}, ks[4] = {b, n, shape->kv_heads, d};
  std::copy(qs, qs + 4, w.q_shape);
  std::copy(ks, ks + 4, w.k_shape);
  const bool empty_q = b * n * shape->heads * d == 0, empty_k = b * n * shape->kv_heads * d == 0;
  RINGATTN_CHECK(empty_q || q != nullptr, fn, ": expected a non-null q, found null");
  RINGATTN_CHECK(empty_k || (k != nullptr && v != nullptr), fn,
                 ": expected non-null k and v, found null");
  w.q = w.like_q(q);
  w.k = w.like_k(k);
  w.v = w.like_k(v);
  if (lse != nullptr) w.lse = w.f32(lse, {b, shape->heads, n});
  if (sink_logits != nullptr) w.sink = w.f32(sink_logits, {shape->heads});
  return w;
}

// A tensor argument by name, for the location check.
struct NamedView {
  const char* name;
  const TensorView* view;
};

// With an "nccl" communicator every tensor must be memory of its GPU: the kernels would fault on
// a host pointer (and read another GPU's memory slowly or not at all), and the ring cannot tell,
// since the ABI tags every view kCUDA. Host communicators are not checked: asking the CUDA
// runtime about a pointer would create a CUDA context in CPU-only processes.
void check_places(const char* fn, Place place, std::initializer_list<NamedView> tensors) {
  if (place.device != Device::kCUDA) return;
#if RINGATTN_WITH_NCCL
  for (const NamedView& t : tensors) {
    if (t.view == nullptr || t.view->data() == nullptr || t.view->numel() == 0) continue;
    cudaPointerAttributes a{};
    const cudaError_t rc = cudaPointerGetAttributes(&a, t.view->data());
    if (rc == cudaErrorInvalidValue) {
      cudaGetLastError();  // CUDA before 11 reported plain host memory this way
      a.type = cudaMemoryTypeUnregistered;
    } else if (rc != cudaSuccess) {
      cudaGetLastError();
      RINGATTN_THROW(ErrorCode::kCuda, fn, ": cudaPointerGetAttributes(", t.name,
                     ") failed: ", cudaGetErrorString(rc));
    }
    if (a.type == cudaMemoryTypeManaged) continue;
    RINGATTN_CHECK(a.type == cudaMemoryTypeDevice, fn, ": expected ", t.name,
                   " in device memory of CUDA device ", place.index,
                   " (the nccl communicator's), found ",
                   a.type == cudaMemoryTypeHost ? "pinned host memory" : "host memory");
    RINGATTN_CHECK(a.device == place.index, fn, ": expected ", t.name, " in memory of CUDA device ",
                   place.index, " (the nccl communicator's), found memory of CUDA device ",
                   a.device);
  }
#else
  (void)tensors;
  RINGATTN_THROW(ErrorCode::kUnsupported, fn, ": CUDA tensors need a build with NCCL");
#endif
}

// Makes a CUDA communicator's GPU the calling thread's current device while it lives (the CUDA
// engine runs on the current device; PyTorch's autograd calls backward from its own threads)
// and restores the caller's device afterwards. Nothing for host communicators.
class DeviceScope {
 public:
  explicit DeviceScope(Place place) {
    if (place.device != Device::kCUDA) return;
#if RINGATTN_WITH_CUDA
    previous_ = cuda::current_device();
    if (previous_ != place.index) cuda::set_device(place.index);
#endif
  }
  ~DeviceScope() {
#if RINGATTN_WITH_CUDA
    if (previous_ < 0) return;
    try {
      cuda::set_device(previous_);
    } catch (...) {
      // Restoring is best effort: the call's own result is what the caller needs to see.
    }
#endif
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace
}  // namespace ringattn

using namespace ringattn;  // NOLINT: the extern "C" definitions below are thin wrappers

extern "C" {

const char* ringattn_version(void) { return RINGATTN_VERSION; }

int ringattn_abi_version(void) { return RINGATTN_ABI_VERSION; }

const char* ringattn_last_error(void) { return g_last_error.c_str(); }

const char* ringattn_status_name(int status) {
  if (status == RINGATTN_OK) return "ok";
  if (status >= RINGATTN_ERROR_INVALID_ARGUMENT && status <= RINGATTN_ERROR_INTERNAL) {
    return error_code_name(static_cast<ErrorCode>(status));
  }
  return "unknown";
}

ringattn_status ringattn_comm_create_mpi(ringattn_comm** out) {
  return guarded([&] {
    check_out(out, "ringattn_comm_create_mpi", "out");
    *out = nullptr;
    {
      std::lock_guard<std::mutex> lock(g_session_mutex);
      if (!g_session) g_session = std::make_unique<MpiSession>();
    }
    auto handle = std::make_unique<ringattn_comm>();
    handle->comm = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD);
    *out = handle.release();
  });
}

ringattn_status ringattn_comm_create_self(ringattn_comm** out) {
  return guarded([&] {
    check_out(out, "ringattn_comm_create_self", "out");
    *out = nullptr;
    auto handle = std::make_unique<ringattn_comm>();
    handle->world = std::make_unique<InprocWorld>(1);
    handle->comm = handle->world->communicator(0);
    *out = handle.release();
  });
}

ringattn_status ringattn_comm_create_nccl(ringattn_comm** out) {
  return guarded([&] {
    check_out(out, "ringattn_comm_create_nccl", "out");
    *out = nullptr;
#if RINGATTN_WITH_NCCL
    {
      std::lock_guard<std::mutex> lock(g_session_mutex);
      if (!g_session) g_session = std::make_unique<MpiSession>();
    }
    auto handle = std::make_unique<ringattn_comm>();
    std::unique_ptr<NcclCommunicator> nccl = make_nccl_communicator(MPI_COMM_WORLD);
    handle->device = nccl->device();
    handle->comm = std::move(nccl);
    *out = handle.release();
#else
    RINGATTN_THROW(ErrorCode::kUnsupported,
                   "ringattn_comm_create_nccl: this build of ringattn has no NCCL (configure "
                   "with CUDA and NCCL installed, RINGATTN_CUDA=ON); use "
                   "ringattn_comm_create_mpi with host tensors");
#endif
  });
}

ringattn_status ringattn_comm_destroy(ringattn_comm* comm) {
  return guarded([&] { delete comm; });
}

ringattn_status ringattn_comm_rank(const ringattn_comm* comm, int* rank) {
  return guarded([&] {
    check_out(rank, "ringattn_comm_rank", "rank");
    *rank = checked_comm(comm, "ringattn_comm_rank").rank();
  });
}

ringattn_status ringattn_comm_size(const ringattn_comm* comm, int* size) {
  return guarded([&] {
    check_out(size, "ringattn_comm_size", "size");
    *size = checked_comm(comm, "ringattn_comm_size").size();
  });
}

const char* ringattn_comm_name(const ringattn_comm* comm) {
  return comm != nullptr && comm->comm != nullptr ? comm->comm->name() : "";
}

ringattn_status ringattn_comm_device(const ringattn_comm* comm, int* device) {
  return guarded([&] {
    check_out(device, "ringattn_comm_device", "device");
    checked_comm(comm, "ringattn_comm_device");
    *device = comm->device;
  });
}

ringattn_status ringattn_allreduce(ringattn_comm* comm, void* data, int64_t count, int type,
                                   int op) {
  return guarded([&] {
    const char* fn = "ringattn_allreduce";
    Communicator& c = checked_comm(comm, fn);
    RINGATTN_CHECK(count >= 0, fn, ": expected count >= 0, found ", count);
    RINGATTN_CHECK(type >= RINGATTN_REDUCE_F32 && type <= RINGATTN_REDUCE_I64, fn,
                   ": expected type 0 (f32), 1 (f64) or 2 (i64), found ", type);
    RINGATTN_CHECK(op >= RINGATTN_SUM && op <= RINGATTN_MIN, fn,
                   ": expected op 0 (sum), 1 (max) or 2 (min), found ", op);
    if (count == 0) return;
    check_out(data, fn, "data");
    const ReduceType types[] = {ReduceType::kF32, ReduceType::kF64, ReduceType::kI64};
    const ReduceOp ops[] = {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin};
    c.allreduce(data, static_cast<size_t>(count), types[type], ops[op]);
  });
}

ringattn_status ringattn_broadcast(ringattn_comm* comm, void* data, int64_t bytes, int root) {
  return guarded([&] {
    const char* fn = "ringattn_broadcast";
    Communicator& c = checked_comm(comm, fn);
    RINGATTN_CHECK(bytes >= 0, fn, ": expected bytes >= 0, found ", bytes);
    RINGATTN_CHECK(root >= 0 && root < c.size(), fn, ": expected root in [0, ", c.size(),
                   "), found ", root);
    if (bytes == 0) return;
    check_out(data, fn, "data");
    c.broadcast(data, static_cast<size_t>(bytes), root);
  });
}

ringattn_status ringattn_barrier(ringattn_comm* comm) {
  return guarded([&] { checked_comm(comm, "ringattn_barrier").barrier(); });
}

ringattn_status ringattn_mpi_finalize(void) {
  return guarded([&] {
    std::lock_guard<std::mutex> lock(g_session_mutex);
    g_session.reset();
  });
}

ringattn_status ringattn_mpi_abort(int code) {
  return guarded([&] {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    RINGATTN_CHECK_CODE(ErrorCode::kMpi, initialized && !finalized,
                        "ringattn_mpi_abort: expected MPI initialised and not finalised, found ",
                        initialized ? "it finalised" : "it not initialised");
    check_mpi(MPI_Abort(MPI_COMM_WORLD, code), "MPI_Abort");
  });
}

ringattn_status ringattn_resolve_layout(const ringattn_spec* spec, int* resolved) {
  return guarded([&] {
    const char* fn = "ringattn_resolve_layout";
    check_out(resolved, fn, "resolved");
    const AttentionSpec s = to_spec(spec, fn);
    *resolved = static_cast<int>(resolve_layout(s.layout, s.causal, s.window));
  });
}

ringattn_status ringattn_shard_positions(const ringattn_spec* spec, int64_t seq_len, int world,
                                         int rank, int64_t* positions, int64_t capacity,
                                         int64_t* count) {
  return guarded([&] {
    const char* fn = "ringattn_shard_positions";
    check_out(count, fn, "count");
    const AttentionSpec s = to_spec(spec, fn);
    RINGATTN_CHECK(world >= 1 && rank >= 0 && rank < world, fn,
                   ": expected 0 <= rank < world, found rank ", rank, ", world ", world);
    const Layout layout = resolve_layout(s.layout, s.causal, s.window);
    check_sharding(seq_len, world, layout, s.sinks);
    const Shard shard = make_shard(seq_len, world, rank, layout);
    *count = shard.size();
    if (positions == nullptr) return;
    RINGATTN_CHECK(capacity >= shard.size(), fn, ": expected capacity >= ", shard.size(),
                   " positions, found ", capacity);
    shard.positions(0, shard.size(), positions);
  });
}

ringattn_status ringattn_forward(ringattn_comm* comm, const ringattn_spec* spec, int64_t seq_len,
                                 const ringattn_shape* shape, int dtype, const void* q,
                                 const void* k, const void* v, const float* sink_logits, void* o,
                                 float* lse, int num_threads) {
  return guarded([&] {
    const char* fn = "ringattn_forward";
    Communicator& c = checked_comm(comm, fn);
    const Place place = place_of(comm);
    std::optional<DeviceScope> device;
    AttentionSpec s;
    Views w;
    TensorView o_view;
    agree(c, [&] {
      device.emplace(place);
      s = to_spec(spec, fn);
      w = make_views(fn, place, shape, dtype, q, k, v, lse, sink_logits);
      RINGATTN_CHECK(o != nullptr || w.q.numel() == 0, fn, ": expected a non-null o, found null");
      o_view = w.like_q(o);
      check_places(fn, place,
                   {{"q", &w.q},
                    {"k", &w.k},
                    {"v", &w.v},
                    {"sink_logits", &w.sink},
                    {"o", &o_view},
                    {"lse", &w.lse}});
    });
    RingOptions options;
    options.num_threads = num_threads;
    forward(c, s, seq_len, w.q, w.k, w.v, sink_logits ? &w.sink : nullptr, o_view,
            lse ? &w.lse : nullptr, options);
  });
}

ringattn_status ringattn_backward(ringattn_comm* comm, const ringattn_spec* spec, int64_t seq_len,
                                  const ringattn_shape* shape, int dtype, const void* q,
                                  const void* k, const void* v, const void* o, const float* lse,
                                  const void* dout, const float* sink_logits, void* dq, void* dk,
                                  void* dv, float* dsink, int num_threads) {
  return guarded([&] {
    const char* fn = "ringattn_backward";
    Communicator& c = checked_comm(comm, fn);
    const Place place = place_of(comm);
    std::optional<DeviceScope> device;
    AttentionSpec s;
    Views w;
    TensorView o_view, lse_view, dout_view, dq_view, dk_view, dv_view, dsink_view;
    agree(c, [&] {
      device.emplace(place);
      s = to_spec(spec, fn);
      w = make_views(fn, place, shape, dtype, q, k, v, lse, sink_logits);
      const bool empty_q = w.q.numel() == 0, empty_k = w.k.numel() == 0;
      RINGATTN_CHECK(
          empty_q || (o != nullptr && dout != nullptr && dq != nullptr && lse != nullptr), fn,
          ": expected non-null o, lse, dout and dq, found null");
      RINGATTN_CHECK(empty_k || (dk != nullptr && dv != nullptr), fn,
                     ": expected non-null dk and dv, found null");
      o_view = w.like_q(o);
      lse_view = w.f32(lse, {shape->batch, shape->heads, shape->seq_local});
      dout_view = w.like_q(dout);
      dq_view = w.like_q(dq);
      dk_view = w.like_k(dk);
      dv_view = w.like_k(dv);
      if (dsink != nullptr) dsink_view = w.f32(dsink, {shape->heads});
      check_places(fn, place,
                   {{"q", &w.q},
                    {"k", &w.k},
                    {"v", &w.v},
                    {"o", &o_view},
                    {"lse", &lse_view},
                    {"dout", &dout_view},
                    {"sink_logits", &w.sink},
                    {"dq", &dq_view},
                    {"dk", &dk_view},
                    {"dv", &dv_view},
                    {"dsink", &dsink_view}});
    });
    RingOptions options;
    options.num_threads = num_threads;
    backward(c, s, seq_len, w.q, w.k, w.v, o_view, lse_view, dout_view,
             sink_logits ? &w.sink : nullptr, dq_view, dk_view, dv_view,
             dsink ? &dsink_view : nullptr, options);
  });
}

}  // extern "C"
