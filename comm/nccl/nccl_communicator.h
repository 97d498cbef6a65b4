#pragma once
/// NcclCommunicator: the Communicator over NCCL, on device buffers, stream ordered. Built only
/// when RINGATTN_WITH_NCCL. nccl.h stays inside comm/nccl/; this header needs the CUDA runtime
/// API (cudaStream_t) and mpi.h (the MPI bootstrap).
///
/// Stream ordering — what a caller must do:
///   * Every NCCL operation runs on the communicator's own stream, stream(), created
///     non-blocking (it does not synchronise with the legacy default stream). An isend reads
///     and an irecv writes its buffer when stream() reaches the operation, which may be long
///     after the call returned.
///   * The data of an isend (and the buffer of an irecv) must be ready when the operation is
///     launched — at the isend/irecv call outside a group, at the outermost group_end() inside
///     one: synchronise the producing stream first (the runtime synchronises its compute
///     stream before posting), or make stream() wait on an event of the producer
///     (cudaStreamWaitEvent(comm.stream(), ev)) before launching.
///   * Neither buffer may be touched until the request's wait() (or test() == true) returned:
///     the send buffer is still read, the receive buffer still written by the GPU. wait()
///     synchronises the host with the operation's completion, so after it any stream and the
///     host may use the buffer.
///   * broadcast/allreduce/barrier are blocking: they return when the result is in the buffer
///     (host or device) and the collective is complete on stream(). Device inputs must be
///     ready (as for isend) when they are called.
///
/// Grouping — what the ring must do:
///   * ncclSend/ncclRecv block the GPU until the peer's matching call runs. A hop that posts
///     irecv from r-1 and isend to r+1 (per direction) must post them all between
///     group_start() and group_end() (or inside a CommGroup): they are then launched as one
///     NCCL group and progress together. Ungrouped, each isend/irecv is launched alone at once,
///     which only works for patterns that cannot wait in a cycle (e.g. rank 0 sends while rank
///     1 receives); a send to self always needs its receive in the same group.
///   * Requests created inside a group complete together: one CUDA event is recorded on
///     stream() at the outermost group_end(). wait()/test() of such a request before that
///     group_end() throws Error(kInvalidArgument). Collectives inside an open group throw too.
///   * NCCL has no tags: messages between two ranks match in posting order, whatever their
///     tags (tags are validated, >= 0, and otherwise ignored). Both sides must therefore post
///     the messages of one peer pair in the same order and with the same sizes (a size
///     mismatch is not detected: it hangs or corrupts). The ring does this naturally: every
///     rank walks its lanes in the same order, receive before send.
///   * Zero-byte isend/irecv complete at once without calling NCCL (sender and receiver agree
///     on the size, so both skip it). Zero-byte collectives return at once on every rank.
///
/// Memory: isend/irecv take device (or managed) memory of this communicator's device; a host
/// pointer is rejected with Error(kUnsupported). broadcast/allreduce also take host memory
/// (the runtime's agreement passes small host records): host data is staged synchronously
/// through a device scratch buffer in chunks of at most kChunkBytes; device buffers are split
/// into the same chunks so that ranks passing host and device buffers still match.
///
/// Errors: every NCCL and CUDA call is checked; failures throw Error(kNccl) / Error(kCuda)
/// naming the call, ncclGetErrorString and ncclGetLastError (or cudaGetErrorString). An NCCL
/// failure (also an asynchronous one seen while waiting) marks the communicator failed: every
/// later call throws, and destruction uses ncclCommAbort instead of ncclCommDestroy.
///
/// Threads: use a communicator from one thread at a time (like an NCCL communicator), except
/// abort(), which any thread may call to release a thread blocked in wait().

#include <cuda_runtime_api.h>
#include <mpi.h>

#include <array>
#include <cstddef>
#include <memory>

#include "comm/communicator.h"

namespace ringattn {
namespace detail {
class NcclState;
}  // namespace detail

class NcclCommunicator final : public Communicator {
 public:
  /// The bytes of an ncclUniqueId (NCCL_UNIQUE_ID_BYTES): what a bootstrap carries from the
  /// rank that created it to every other rank.
  using UniqueId = std::array<char, 128>;
  /// Largest piece of one NCCL broadcast/allreduce call, and of the host staging buffer.
  static constexpr size_t kChunkBytes = size_t{16} << 20;

  /// ncclGetUniqueId: create on one rank, hand to all (MPI, files, a one-rank world: locally).
  /// Throws Error(kNccl).
  static UniqueId new_unique_id();

  /// Rank `rank` of `nranks` (one process or thread per rank, all with the same `id`) on CUDA
  /// device `device`: creates the stream and runs ncclCommInitRankConfig (blocking; returns
  /// when every rank joined). Restores the calling thread's current device afterwards.
  /// Throws Error(kInvalidArgument) for bad ranks/devices, kCuda without a device, kNccl.
  NcclCommunicator(const UniqueId& id, int nranks, int rank, int device);
  /// Releases the communicator once the last Request of it is gone: ncclCommDestroy when its
  /// stream is idle, ncclCommAbort when work is pending or an NCCL call failed. Never throws.
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override;
  int size() const override;
  /// "nccl".
  const char* name() const override { return "nccl"; }
  /// kCUDA only: tensors of isend/irecv must be device tensors. (broadcast/allreduce still
  /// accept host pointers, see above.)
  bool accepts(Device device) const override { return device == Device::kCUDA; }

  /// ncclSend of `bytes` bytes (ncclUint8) to `peer` on stream(); see the header comment for
  /// grouping and readiness. The request's wait() blocks until the send completed on stream().
  RequestPtr isend(const void* data, size_t bytes, int peer, int tag) override;
  /// ncclRecv of exactly `bytes` bytes from `peer` on stream().
  RequestPtr irecv(void* data, size_t bytes, int peer, int tag) override;
  using Communicator::irecv;
  using Communicator::isend;

  /// In-place ncclBroadcast from `root` (host or device buffer), blocking.
  void broadcast(void* data, size_t bytes, int root) override;
  /// In-place ncclAllReduce (f32/f64/i64 -> ncclFloat32/ncclFloat64/ncclInt64, sum/max/min),
  /// host or device buffer, blocking.
  void allreduce(void* data, size_t count, ReduceType type, ReduceOp op) override;
  /// A one-element ncclAllReduce on scratch memory, blocking.
  void barrier() override;

  /// ncclGroupStart (outermost only): isend/irecv until the matching group_end are launched
  /// together.
  void group_start() override;
  /// ncclGroupEnd (outermost only), then one completion event is recorded on stream() for
  /// every request of the group.
  void group_end() override;

  /// The stream every operation of this communicator runs on.
  cudaStream_t stream() const;
  /// The CUDA device of this communicator.
  int device() const;
  /// ncclCommAbort: pending operations are abandoned, a wait() blocked in another thread
  /// throws, every later call throws Error(kNccl). For failing jobs; idempotent, never throws.
  void abort() noexcept;

 private:
  std::shared_ptr<detail::NcclState> state_;
};

/// Collective over `comm` (MPI must be initialised): picks the GPU from the node-local rank
/// (MPI_Comm_split_type(MPI_COMM_TYPE_SHARED): local rank % device count) and makes it the
/// calling thread's current device, lets rank 0 create the unique id and MPI_Bcast it, and
/// initialises rank comm.rank of comm.size. Every rank throws together (Error(kUnsupported))
/// when a node has no device or more ranks than devices (NCCL needs one GPU per rank: use the
/// in-process communicator for virtual ranks on one GPU), or when rank 0 could not create the
/// id (Error(kNccl)).
std::unique_ptr<NcclCommunicator> make_nccl_communicator(MPI_Comm comm);

}  // namespace ringattn
