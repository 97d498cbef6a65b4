#pragma once
/// The in-process communicator: P ranks as threads of one process. Used by fast unit tests of
/// the ring and (with device buffers, later) to run P virtual ranks on one GPU.
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
  /// A world of `size` >= 1 ranks. `wait_timeout` zero means wait forever.
  explicit InprocWorld(int size,
                       std::chrono::milliseconds wait_timeout = std::chrono::milliseconds::zero());
  ~InprocWorld();
  InprocWorld(const InprocWorld&) = delete;
  InprocWorld& operator=(const InprocWorld&) = delete;

  /// Number of ranks.
  int size() const;
  /// The Communicator of rank `rank` (name "inproc"; accepts kCPU only). Thread-safe; call it
  /// from the thread that plays that rank.
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
