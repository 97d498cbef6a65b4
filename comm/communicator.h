#pragma once
/// The Communicator interface: what the ring, the sink broadcast and the KV cache need from a
/// transport. Implementations: comm/mpi (host buffers), comm/inproc (ranks as threads of one
/// process), comm/nccl (device buffers, stream ordered).
///
/// Semantics shared by every implementation:
///   * isend/irecv are nonblocking; the buffer must stay valid and untouched until wait().
///     Messages between one (source, destination, tag) triple arrive in the order posted.
///   * broadcast/allreduce/barrier are collectives: every rank calls them in the same order.
///   * group_start/group_end bracket point-to-point operations that must be launched together
///     (NCCL needs it for the ring's irecv-from-r-1 + isend-to-r+1 pattern; MPI and inproc
///     ignore it). Portable code posts each hop's sends and receives inside one group and
///     waits only after group_end.
///   * Errors are thrown as ringattn::Error (code kMpi, kNccl, kCuda or kInternal) naming the
///     call; misuse (bad peer, tag, buffer) is kInvalidArgument or kUnsupported.

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

  /// Operations posted between group_start and group_end are launched together (NCCL group);
  /// other transports ignore it. Groups may nest (only the outermost group_end launches).
  /// Inside a group only isend/irecv may be called, and their requests may be waited or
  /// tested only after the outermost group_end.
  virtual void group_start() {}
  /// Closes the group opened by the matching group_start (see there).
  virtual void group_end() {}

  /// Nonblocking send/receive of a whole contiguous tensor (checks device and contiguity).
  RequestPtr isend(const TensorView& t, int peer, int tag);
  RequestPtr irecv(const TensorView& t, int peer, int tag);
};

/// Scope of a group: group_start() now, group_end() at end() or, if end() was not reached
/// (an exception unwinds), in the destructor, whose errors are swallowed. Ending a group on
/// the error path launches what was posted so far rather than leaving the transport's group
/// open for every later call of this thread.
class CommGroup {
 public:
  explicit CommGroup(Communicator& comm) : comm_(&comm) { comm.group_start(); }
  ~CommGroup() {
    if (comm_ == nullptr) return;
    try {
      comm_->group_end();
    } catch (...) {
      // Already unwinding (or ending twice): the first error is the one to report.
    }
  }
  CommGroup(const CommGroup&) = delete;
  CommGroup& operator=(const CommGroup&) = delete;
  /// Closes the group (throws what group_end throws). Call once, before waiting.
  void end() {
    Communicator* comm = comm_;
    comm_ = nullptr;
    if (comm != nullptr) comm->group_end();
  }

 private:
  Communicator* comm_;
};

/// Waits for a request if it is non-null (null requests are used for skipped transfers).
inline void wait(RequestPtr& r) {
  if (r) r->wait();
}

}  // namespace ringattn
