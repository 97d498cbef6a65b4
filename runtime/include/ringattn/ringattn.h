#ifndef RINGATTN_RINGATTN_H_
#define RINGATTN_RINGATTN_H_
/// The stable C ABI of ringattn: opaque communicator handles, plain structs, raw pointers and
/// integer status codes. Nothing here throws, aborts or exits: every function returns a
/// ringattn_status, and on failure ringattn_last_error() holds a one-line message for the
/// calling thread. Usable from C99 and from any FFI (the Python package is built on it).
///
/// Tensors are contiguous row-major buffers, as in the C++ API (SPEC section 1):
///   q, o, dq, dout   [B, N_local, H, D]        k, v, dk, dv  [B, N_local, H_kv, D]
///   lse              [B, H, N_local] f32       sink_logits, dsink  [H] f32
/// q/k/v/o/dout/dq/dk/dv share one dtype (ringattn_dtype); lse, sink_logits, dsink are f32.
/// Every rank passes ITS shard of the global sequence of seq_len tokens, in the order of the
/// resolved layout (ringattn_shard_positions tells which global positions that is).
///
/// Where tensors live: where the communicator passes buffers. Host memory for "mpi" and
/// "inproc" (self) communicators; device memory of the communicator's GPU
/// (ringattn_comm_device) for "nccl" ones, where forward/backward run the CUDA kernels. Every
/// tensor of one call lives in the same place; ringattn_allreduce/ringattn_broadcast also
/// take host memory with an "nccl" communicator (staged through the device).
///
/// CUDA tensors and streams: forward/backward read their inputs from their own internal
/// stream, which does not wait for the caller's streams, so the caller must synchronise the
/// stream(s) that produced the inputs (and that last used the output buffers) before the call
/// (from PyTorch: torch.cuda.current_stream(device).synchronize()). The calls are blocking:
/// on return the outputs are complete and may be used from any stream and from the host. The
/// communicator's GPU is made the calling thread's current device for the call (the caller's
/// is restored afterwards), so any thread may call.
///
/// Errors across ranks: every argument check of ringattn_forward/ringattn_backward (spec,
/// shape, dtype, null pointers, and with an "nccl" communicator the location of every pointer,
/// see above) runs inside one agreement over the communicator (a small allreduce), as do the
/// ring's own checks: a bad argument on one rank returns the same error status on every rank
/// (the other ranks' messages end "(reported by rank r)"), never a hang. Only a null
/// communicator is reported locally.
///
/// Compatibility: RINGATTN_ABI_VERSION changes only when a signature or a struct changes;
/// new functions and new enum values do not change it.

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RINGATTN_ABI_VERSION 1

/// Status codes: 0 is success, the others are the C++ ErrorCode values (ringattn/error.h).
typedef enum ringattn_status {
  RINGATTN_OK = 0,
  RINGATTN_ERROR_INVALID_ARGUMENT = 1,
  RINGATTN_ERROR_UNSUPPORTED = 2,
  RINGATTN_ERROR_CUDA = 3,
  RINGATTN_ERROR_NCCL = 4,
  RINGATTN_ERROR_MPI = 5,
  RINGATTN_ERROR_IO = 6,
  RINGATTN_ERROR_INTERNAL = 7,
} ringattn_status;

/// Element type of q, k, v, o, dout, dq, dk, dv.
typedef enum ringattn_dtype {
  RINGATTN_F32 = 0,
  RINGATTN_BF16 = 1,
  RINGATTN_F16 = 2,
} ringattn_dtype;

/// How the global sequence is sharded (SPEC section 3).
typedef enum ringattn_layout {
  RINGATTN_LAYOUT_AUTO = 0,  ///< zigzag for causal with window 0, contiguous otherwise
  RINGATTN_LAYOUT_CONTIGUOUS = 1,
  RINGATTN_LAYOUT_ZIGZAG = 2,
} ringattn_layout;

/// Element type and operation of ringattn_allreduce.
typedef enum ringattn_reduce_type {
  RINGATTN_REDUCE_F32 = 0,
  RINGATTN_REDUCE_F64 = 1,
  RINGATTN_REDUCE_I64 = 2,
} ringattn_reduce_type;
typedef enum ringattn_reduce_op {
  RINGATTN_SUM = 0,
  RINGATTN_MAX = 1,
  RINGATTN_MIN = 2,
} ringattn_reduce_op;

/// Which keys a query sees (SPEC section 2). Zero-initialise, then set fields.
typedef struct ringattn_spec {
  int32_t causal;  ///< non-zero: key j visible to query i only if j <= i
  int32_t layout;  ///< a ringattn_layout
  int64_t window;  ///< sliding window W (0 = unlimited)
  int64_t sinks;   ///< the first S global positions are visible through any window
  float scale;     ///< score scale; 0 means 1/sqrt(D)
} ringattn_spec;

/// Shapes of this rank's shard.
typedef struct ringattn_shape {
  int64_t batch;      ///< B
  int64_t seq_local;  ///< N_local (this rank's tokens)
  int64_t heads;      ///< H (query heads)
  int64_t kv_heads;   ///< H_kv (H % H_kv == 0)
  int64_t head_dim;   ///< D
} ringattn_shape;

/// A communicator: the ranks that run one ring together. Opaque.
typedef struct ringattn_comm ringattn_comm;

/// Library version "major.minor.patch" (static string).
const char* ringattn_version(void);
/// RINGATTN_ABI_VERSION of the library actually loaded.
int ringattn_abi_version(void);
/// The message of the last failed call on this thread ("" if none). Valid until the next call
/// into the library on this thread.
const char* ringattn_last_error(void);
/// Short name of a status code ("ok", "invalid argument", "mpi", ...; "unknown" otherwise).
const char* ringattn_status_name(int status);

/// A communicator over MPI_COMM_WORLD (duplicated). Initialises MPI (MPI_Init_thread,
/// MPI_THREAD_MULTIPLE requested) if nobody has; an MPI initialised by the application is
/// adopted and left to it. Collective over MPI_COMM_WORLD.
ringattn_status ringattn_comm_create_mpi(ringattn_comm** out);
/// A one-rank communicator that needs no MPI (single-process use and tests).
ringattn_status ringattn_comm_create_self(ringattn_comm** out);
/// A communicator over MPI_COMM_WORLD whose tensors are CUDA device buffers, moved by NCCL.
/// Collective over MPI_COMM_WORLD; initialises MPI as ringattn_comm_create_mpi does. Each rank
/// uses one GPU, chosen by its node-local rank (local rank % device count), and that GPU
/// becomes the calling thread's current device. One GPU per rank: a node with more ranks than
/// GPUs, or without a GPU, fails on every rank with RINGATTN_ERROR_UNSUPPORTED (for several
/// ranks on one GPU use the `ringattn` program's --virtual-ranks). In a build without NCCL it
/// returns RINGATTN_ERROR_UNSUPPORTED at once, without initialising MPI.
ringattn_status ringattn_comm_create_nccl(ringattn_comm** out);
/// Frees a communicator (null is ignored). Collective for MPI and NCCL communicators.
ringattn_status ringattn_comm_destroy(ringattn_comm* comm);
/// This rank and the number of ranks.
ringattn_status ringattn_comm_rank(const ringattn_comm* comm, int* rank);
ringattn_status ringattn_comm_size(const ringattn_comm* comm, int* size);
/// "mpi", "inproc" or "nccl" (static string; "" for a null handle).
const char* ringattn_comm_name(const ringattn_comm* comm);
/// The CUDA device whose memory the communicator's tensors live in ("nccl"), or -1 for a
/// communicator of host buffers ("mpi", "inproc").
ringattn_status ringattn_comm_device(const ringattn_comm* comm, int* device);
/// Blocking in-place allreduce of `count` elements of `data` over the communicator (host
/// memory, or with an "nccl" communicator host or device memory of its GPU).
ringattn_status ringattn_allreduce(ringattn_comm* comm, void* data, int64_t count, int type,
                                   int op);
/// Blocking broadcast of `bytes` bytes from `root` (memory as for ringattn_allreduce).
ringattn_status ringattn_broadcast(ringattn_comm* comm, void* data, int64_t bytes, int root);
/// Blocks until every rank arrived.
ringattn_status ringattn_barrier(ringattn_comm* comm);
/// Finalises MPI if ringattn_comm_create_mpi or ringattn_comm_create_nccl initialised it
/// (destroy MPI and NCCL communicators first).
/// Idempotent; MPI cannot be initialised again afterwards.
ringattn_status ringattn_mpi_finalize(void);
/// MPI_Abort(MPI_COMM_WORLD, code): ends every rank of the job. For an application's top-level
/// error handler only (a rank that dies while others wait in a collective); the library never
/// calls it. Returns (an error) only when MPI is not initialised or already finalised.
ringattn_status ringattn_mpi_abort(int code);

/// The layout actually used for this spec (never RINGATTN_LAYOUT_AUTO).
ringattn_status ringattn_resolve_layout(const ringattn_spec* spec, int* resolved);
/// Number of tokens rank `rank` of `world` holds of a sequence of seq_len tokens, and (if
/// positions is non-null) their global positions in local order, written to
/// positions[0 .. *count) (capacity elements available; too small is an error). Validates
/// the sharding as the ring does (N >= P, the sinks inside rank 0's first run).
ringattn_status ringattn_shard_positions(const ringattn_spec* spec, int64_t seq_len, int world,
                                         int rank, int64_t* positions, int64_t capacity,
                                         int64_t* count);

/// Ring attention forward for this rank's shard (a collective: every rank of comm calls it).
/// sink_logits may be null; lse may be null. num_threads 0: the kernel's default (CPU kernels
/// only). Tensors live where the communicator passes buffers (see the top of this file).
/// Blocking: o and lse are complete on return.
ringattn_status ringattn_forward(ringattn_comm* comm, const ringattn_spec* spec, int64_t seq_len,
                                 const ringattn_shape* shape, int dtype, const void* q,
                                 const void* k, const void* v, const float* sink_logits, void* o,
                                 float* lse, int num_threads);

/// Ring attention backward (SPEC section 5) from the forward's o and lse and the output
/// gradient dout. Writes dq, dk, dv (the dtype of q) and, if dsink is non-null, dz [H] summed
/// over all ranks (zeros without sink_logits). A collective; tensors and blocking as in
/// ringattn_forward.
ringattn_status ringattn_backward(ringattn_comm* comm, const ringattn_spec* spec, int64_t seq_len,
                                  const ringattn_shape* shape, int dtype, const void* q,
                                  const void* k, const void* v, const void* o, const float* lse,
                                  const void* dout, const float* sink_logits, void* dq, void* dk,
                                  void* dv, float* dsink, int num_threads);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // RINGATTN_RINGATTN_H_
