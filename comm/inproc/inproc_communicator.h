#pragma once
/// The in-process communicator: P ranks as threads of one process. Used by fast unit tests of
/// the ring and (a CUDA world) to run P virtual ranks on one GPU, which NCCL cannot do.
///
/// Point-to-point is buffered, like MPI's eager mode: isend copies the payload before it
/// returns — straight into the receiver's buffer when a matching irecv is already posted,
/// else into a staging buffer that the matching irecv copies from — so a send completes
/// without the receiver and the ring pattern (irecv from r-1, isend to r+1, wait on both)
/// cannot deadlock. Receives match messages per (source, destination, tag) in posting order.
///
/// Collectives are rounds numbered per rank (the k-th collective of every rank meets in round
/// k): ranks publish their buffers, wait for all P, do the work, and wait again only where
/// another rank may still read their buffer. allreduce reduces each element in rank order, so
/// every rank gets bit-identical results.
///
/// Device buffers (a world made with Device::kCUDA): every buffer may be host or device
/// memory of the world's GPU; copies use cudaMemcpyAsync(cudaMemcpyDefault) on a per-rank
/// internal non-blocking stream and are complete (host-synchronised) before the call that
/// made them returns. So, exactly as with NCCL's stream contract: the caller must have
/// synchronised the work that produced a send buffer (or a broadcast root's buffer, or an
/// allreduce input) before the call, because the copy does not wait for the caller's streams;
/// after a receive's wait() or a collective's return the data is in place for every stream.
/// An early message of a device buffer is staged in device memory (stream-ordered allocator),
/// else on the host. allreduce copies device inputs to the host, reduces there (same rank-order
/// result as a CPU world) and copies the result back. group_start/group_end are ignored (sends
/// are eager, so no pattern needs them). The thread that calls communicator(r) gets the
/// world's device made current.
///
/// Failure: the world can be aborted (run_inproc does it when a rank throws); every blocked
/// wait or collective then throws Error(kInternal, "in-process world aborted: rank r
/// failed"). An optional wait timeout turns a deadlock into an Error naming what was awaited.

#include <chrono>
#include <functional>
#include <memory>

#include "comm/communicator.h"

namespace ringattn {
namespace detail {
class InprocState;
}  // namespace detail

/// Shared state of P in-process ranks: mailboxes, collective rounds, abort flag, timeout.
/// Cheap handle: communicators keep the state alive, so they may outlive the InprocWorld.
class InprocWorld {
 public:
  /// A world of `size` >= 1 ranks. `wait_timeout` zero means wait forever. `device` kCUDA
  /// makes a world whose ranks pass buffers of CUDA device `device_index` (see above); it
  /// throws Error(kUnsupported) in a build without CUDA or on a machine without a device,
  /// Error(kInvalidArgument) for a device index that does not exist.
  explicit InprocWorld(int size,
                       std::chrono::milliseconds wait_timeout = std::chrono::milliseconds::zero(),
                       Device device = Device::kCPU, int device_index = 0);
  ~InprocWorld();
  InprocWorld(const InprocWorld&) = delete;
  InprocWorld& operator=(const InprocWorld&) = delete;

  /// Number of ranks.
  int size() const;
  /// kCPU, or kCUDA for a world of device buffers.
  Device device() const;
  /// The CUDA device of a kCUDA world (0 in a CPU world).
  int device_index() const;
  /// The Communicator of rank `rank` (name "inproc"; accepts kCPU, and kCUDA in a CUDA world).
  /// Thread-safe; call it from the thread that plays that rank (a CUDA world makes its device
  /// current on that thread: Error(kCuda) if that fails).
  std::unique_ptr<Communicator> communicator(int rank);

  /// How long a blocked wait/collective waits before it throws Error(kInternal) naming what it
  /// waited for (zero: forever). Applies to waits that start after the call.
  void set_wait_timeout(std::chrono::milliseconds timeout);
  std::chrono::milliseconds wait_timeout() const;

  /// Marks the world failed because of `failed_rank`: every blocked and every later wait,
  /// collective or send of any rank throws Error(kInternal). Idempotent (the first rank wins).
  void abort(int failed_rank);
  /// Whether abort() was called.
  bool aborted() const;

 private:
  std::shared_ptr<detail::InprocState> state_;
};

/// Runs fn(communicator of rank r) on `world` threads (each with ScopedRank(r)) and joins
/// them. If a rank throws, the world is aborted so no other rank hangs; after every thread
/// finished, the first exception in rank order that is not a consequence of the abort is
/// rethrown (if all are, the first in rank order).
void run_inproc(int world, const std::function<void(Communicator&)>& fn);
/// As above on an existing world (e.g. one with a wait timeout). An aborted world stays
/// aborted.
void run_inproc(InprocWorld& world, const std::function<void(Communicator&)>& fn);

}  // namespace ringattn
