#pragma once
/// MpiCommunicator: the Communicator over MPI point-to-point and collectives, on host buffers
/// (device buffers only when the MPI library reports itself CUDA-aware). mpi.h stays inside
/// comm/mpi/: public runtime headers see only comm/communicator.h.

#include <mpi.h>

#include <cstddef>
#include <string>

#include "comm/communicator.h"

namespace ringattn {

/// Throws Error(kMpi) naming `call`, `context` (peer, tag, sizes) and MPI_Error_string(rc)
/// when rc is not MPI_SUCCESS.
void check_mpi(int rc, const char* call, const std::string& context = std::string());

/// A Communicator on its own duplicate of an MPI communicator (so our tags never meet the
/// application's), with MPI_ERRORS_RETURN: every MPI failure becomes Error(kMpi), never an
/// abort. Messages larger than INT_MAX bytes are split into chunks of at most `chunk_bytes`
/// sent under the same tag; MPI's non-overtaking rule keeps them in order.
///
/// Thread safety: calls from several threads at once need the MPI library to provide
/// MPI_THREAD_MULTIPLE (see MpiSession::thread_level()); otherwise use it from one thread.
class MpiCommunicator : public Communicator {
 public:
  /// Largest single MPI transfer: 1 GiB (a power of two below INT_MAX keeps chunks aligned).
  static constexpr size_t kDefaultChunkBytes = size_t{1} << 30;

  /// Collective over `comm`: duplicates it (MPI_Comm_dup) and sets MPI_ERRORS_RETURN on the
  /// copy. `chunk_bytes` (1..INT_MAX) is the largest byte count of one MPI call; tests lower
  /// it to exercise the chunked path without 2 GiB buffers. Every rank must pass the same
  /// value. Throws Error(kMpi) when MPI is not initialised (create an MpiSession first).
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD, size_t chunk_bytes = kDefaultChunkBytes);
  /// Frees the duplicated communicator (skipped once MPI is finalised). Never throws.
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  /// "mpi".
  const char* name() const override { return "mpi"; }
  /// kCPU always; kCUDA only when MPIX_Query_cuda_support() says so (OpenMPI mpi-ext.h).
  bool accepts(Device device) const override;

  /// MPI_Isend of `bytes` (chunked). peer/tag must be >= 0 (wildcards are rejected with
  /// kInvalidArgument); a peer >= size() or a tag above MPI_TAG_UB fails in MPI: Error(kMpi).
  RequestPtr isend(const void* data, size_t bytes, int peer, int tag) override;
  /// MPI_Irecv of exactly `bytes` (chunked as the sender chunked them); wait() throws
  /// Error(kMpi) if a shorter message arrived. Sender and receiver must agree on the size: a
  /// longer message is undefined in MPI (OpenMPI may truncate it silently).
  RequestPtr irecv(void* data, size_t bytes, int peer, int tag) override;
  using Communicator::irecv;
  using Communicator::isend;

  /// MPI_Bcast in chunks of at most chunk_bytes.
  void broadcast(void* data, size_t bytes, int root) override;
  /// In-place MPI_Allreduce (MPI_FLOAT / MPI_DOUBLE / MPI_INT64_T with MPI_SUM / MAX / MIN),
  /// in chunks of at most chunk_bytes.
  void allreduce(void* data, size_t count, ReduceType type, ReduceOp op) override;
  /// MPI_Barrier.
  void barrier() override;

  /// The duplicated communicator (owned by this object).
  MPI_Comm comm() const { return comm_; }
  /// Largest byte count of one MPI call.
  size_t chunk_bytes() const { return chunk_bytes_; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 0;
  size_t chunk_bytes_;
  bool cuda_aware_ = false;
};

}  // namespace ringattn
