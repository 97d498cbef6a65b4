#pragma once
/// The Communicator interface: what the ring, the sink broadcast and the KV cache need from a
/// transport. Implementations: comm/mpi (host buffers), comm/inproc (ranks as threads of one
/// process), comm/nccl (device buffers, stream ordered).
///
/// Semantics shared by every implementation:
///   * isend/irecv are nonblocking; the buffer must stay valid and untouched until wait().
///     Messages between one (source, destination, tag) triple arrive in the order posted.
///   * broadcast/allreduce/barrier are collectives: every rank calls them in the same order.
///   * Errors are thrown as ringattn::Error (code kMpi, kNccl or kInternal) naming the call.

#include <cstddef>
#include <cstdint>
#include <memory>

#include "ringattn/tensor.h"

namespace ringattn {

/// A pending nonblocking operation.
class Request {
 public:
  virtual ~Request() = default;
  /// Blocks until the operation completed. Idempotent.
  virtual void wait() = 0;
  /// True when the operation completed (never blocks).
  virtual bool test() = 0;
};
using RequestPtr = std::unique_ptr<Request>;

/// Element type of an allreduce.
enum class ReduceType : uint8_t { kF32, kF64, kI64 };
/// Reduction of an allreduce.
enum class ReduceOp : uint8_t { kSum, kMax, kMin };

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// "mpi", "inproc", "nccl".
  virtual const char* name() const = 0;
  /// Whether buffers on this device may be passed.
  virtual bool accepts(Device device) const = 0;

  /// Nonblocking send of `bytes` bytes to `peer` with `tag` (tag >= 0).
  virtual RequestPtr isend(const void* data, size_t bytes, int peer, int tag) = 0;
  /// Nonblocking receive of exactly `bytes` bytes from `peer` with `tag`.
  virtual RequestPtr irecv(void* data, size_t bytes, int peer, int tag) = 0;

  /// Blocking broadcast of `bytes` bytes from `root` to every rank.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  /// Blocking in-place allreduce of `count` elements.
  virtual void allreduce(void* data, size_t count, ReduceType type, ReduceOp op) = 0;
  /// Blocks until every rank reached the barrier.
  virtual void barrier() = 0;

  /// Nonblocking send/receive of a whole contiguous tensor (checks device and contiguity).
  RequestPtr isend(const TensorView& t, int peer, int tag);
  RequestPtr irecv(const TensorView& t, int peer, int tag);
};

/// Waits for a request if it is non-null (null requests are used for skipped transfers).
inline void wait(RequestPtr& r) {
  if (r) r->wait();
}

}  // namespace ringattn
