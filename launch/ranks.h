#pragma once
/// Where a subcommand computes: the ranks (MPI processes, NCCL ranks, or in-process virtual
/// ranks on one GPU) and the memory of its tensors (host or CUDA device), chosen by --backend
/// and --virtual-ranks.

#include <cstddef>
#include <functional>
#include <string>

#include "comm/communicator.h"
#include "comm/mpi/mpi_communicator.h"
#include "runtime/src/backend.h"
#include "runtime/src/ring_engine.h"

namespace ringattn::launch {

/// Runs fn(communicator) on every rank this job computes with, and returns when they are done:
///   * virtual_ranks > 0 (a single MPI process): that many in-process ranks as threads, on the
///     CPU or, with the CUDA backend, all on this process's GPU (each with its own streams);
///   * else the MPI ranks: over MPI for the CPU backend, over NCCL (one GPU per rank, chosen by
///     the node-local rank) for CUDA.
/// The flags must have been agreed over `mpi` first; fn's rank 0 reports.
void run_on_ranks(MpiCommunicator& mpi, Backend backend, int virtual_ranks,
                  const std::function<void(Communicator&)>& fn);

/// Checks --virtual-ranks against the job (inside agree()): >= 0, and only with one MPI rank.
void check_virtual_ranks(int virtual_ranks, int mpi_world);

/// The device tensors of a backend live on.
inline Device backend_device(Backend backend) {
  return backend == Backend::kCuda ? Device::kCUDA : Device::kCPU;
}

/// Synchronous copy of bytes between host memory and memory of `device` (either direction).
void copy_bytes(void* dst, const void* src, size_t bytes, Device device);

/// A buffer of bytes on a backend's device with a view helper.
class TensorBuffer {
 public:
  TensorBuffer(Device device, DType dtype, std::initializer_list<int64_t> shape);
  TensorView view() const { return view_; }
  char* data() { return buf_.data(); }
  size_t bytes() const { return buf_.size(); }
  /// Copies bytes() bytes from host memory into the buffer.
  void upload(const void* host);
  /// Copies the buffer to host memory.
  void download(void* host);

 private:
  detail::ByteBuffer buf_;
  TensorView view_;
};

}  // namespace ringattn::launch
