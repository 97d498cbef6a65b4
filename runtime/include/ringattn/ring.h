#pragma once
/// The distributed entry points: ring attention forward over a Communicator (SPEC section 4).
///
/// Every rank passes ITS shard of the global sequence, in the order of the resolved layout
/// (see sharding: contiguous or zigzag), and the global length N. Shapes as FlashAttention:
/// q, o [B, N_local, H, D]; k, v [B, N_local, H_kv, D]; lse [B, H, N_local] f32;
/// sink_logits [H] f32 (the same on every rank). Blocking: returns when this rank's o and lse
/// are final. All ranks must call it together (it is a collective).

#include <cstdint>
#include <string>
#include <utility>

#include "comm/communicator.h"
#include "ringattn/attention.h"

namespace ringattn {

/// Per-rank account of where the time went and what moved.
struct RingStats {
  double total_s = 0.0;      ///< wall time of the call
  double agree_s = 0.0;      ///< configuration agreement (one small allreduce)
  double broadcast_s = 0.0;  ///< sink K/V broadcast
  double compute_s = 0.0;    ///< folding blocks (kernel time) and finalising
  double comm_wait_s = 0.0;  ///< blocked waiting for ring transfers (exposed communication)
  double pack_s = 0.0;       ///< copying block ranges into send buffers
  uint64_t bytes_sent = 0;   ///< ring + broadcast bytes this rank sent
  uint64_t bytes_received = 0;
  int ring_steps = 0;       ///< hops the ring ran (after the local step)
  int blocks_computed = 0;  ///< blocks folded (sinks, local, received)
  int blocks_skipped = 0;   ///< received or local blocks with nothing visible
  int64_t tiles_computed = 0, tiles_skipped = 0;
  double flops = 0.0;  ///< matrix FLOPs over computed tiles
};

/// Options that do not change the result.
struct RingOptions {
  int num_threads = 0;  ///< CPU kernel threads (0: the kernel's default)
};

/// Ring attention forward for this rank's shard of a global sequence of seq_len tokens.
/// Agrees on the configuration first: any local validation error or mismatch between ranks
/// throws Error on EVERY rank (never a hang). Writes o (q's shape, any dtype) and, if lse is
/// non-null, lse. sink_logits may be null.
RingStats forward(Communicator& comm, const AttentionSpec& spec, int64_t seq_len,
                  const TensorView& q, const TensorView& k, const TensorView& v,
                  const TensorView* sink_logits, const TensorView& o, const TensorView* lse,
                  const RingOptions& options = {});

/// Ring attention backward (SPEC section 5) for this rank's shard, with the forward's o and lse
/// and the output gradient dout (q's shape). K/V blocks travel as in the forward, their dk/dv
/// f32 accumulators travel with them (one hop behind, overlapping the next block's compute) and
/// go straight back to their owner after the last rank that needs them; the sinks' dk/dv are
/// summed over all ranks into rank 0's positions 0..S-1. Writes dq (q's shape), dk and dv (k's
/// shape), any dtype; dsink ([H] f32, may be null) gets dz summed over all ranks, the same on
/// every rank (zeros without sink_logits). Agreement and errors as forward(). Blocking.
RingStats backward(Communicator& comm, const AttentionSpec& spec, int64_t seq_len,
                   const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& o, const TensorView& lse, const TensorView& dout,
                   const TensorView* sink_logits, const TensorView& dq, const TensorView& dk,
                   const TensorView& dv, const TensorView* dsink, const RingOptions& options = {});

/// An Error every rank of the communicator raised together (through agree()): the ranks are
/// still in step, so a program may shut down normally instead of aborting the job.
class AgreedError : public Error {
 public:
  using Error::Error;
};

/// Runs `local_step` on every rank, then agrees across ranks: if any rank's step threw, every
/// rank throws an AgreedError carrying the lowest failing rank's message (with "(reported by rank
/// k)" on the other ranks). A collective: one allreduce, plus one broadcast on failure.
template <typename Fn>
void agree(Communicator& comm, Fn&& local_step);

namespace detail {
/// What a rank's local step did: threw (with the error's code and message) or not.
struct LocalStatus {
  bool failed = false;
  ErrorCode code = ErrorCode::kInternal;
  std::string message;
};

/// Runs `local_step`, turning any exception into a LocalStatus (the local half of agree()).
template <typename Fn>
LocalStatus run_local(Fn&& local_step) {
  LocalStatus s;
  try {
    local_step();
  } catch (const Error& e) {
    s.failed = true;
    s.code = e.code();
    s.message = e.message();
  } catch (const std::exception& e) {
    s.failed = true;
    s.message = e.what();
  }
  return s;
}

/// Non-template part of agree(): `failed` and `message` describe this rank's local step.
void agree_status(Communicator& comm, bool failed, ErrorCode code, const std::string& message);
}  // namespace detail

template <typename Fn>
void agree(Communicator& comm, Fn&& local_step) {
  const detail::LocalStatus s = detail::run_local(std::forward<Fn>(local_step));
  detail::agree_status(comm, s.failed, s.code, s.message);
}

}  // namespace ringattn
