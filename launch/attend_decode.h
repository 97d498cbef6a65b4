#pragma once
/// `ringattn attend --decode-from N0` (SPEC section 7): positions 0..N0-1 are prefilled through
/// the ring into the distributed KV cache, then positions N0..N-1 are decoded one token at a
/// time. Each rank reads only its prefill shard; the decode tokens are read by every rank,
/// because decode inputs are replicated (every rank attends the new query over its own cache).

#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "ringattn/attention.h"
#include "ringattn/ring.h"
#include "runtime/src/npy.h"
#include "runtime/src/sharding.h"

namespace ringattn::launch {

/// Throws Error naming the problem unless 1 <= N0 <= N, N0 >= P, the mask is causal (a
/// non-causal query sees tokens that have not arrived yet, so decode could not reproduce the
/// whole-sequence output) and the sinks fit rank 0's first prefill chunk.
void check_decode_from(int64_t decode_from, int64_t seq_len, int world, const AttentionSpec& spec);

/// What the decode part produced on this rank (the same on every rank).
struct DecodeFromResult {
  Shard decoded;           ///< positions N0..N-1 as one run
  std::vector<float> o;    ///< [B, N - N0, H, D] f32
  std::vector<float> lse;  ///< [B, H, N - N0] f32
  RingStats prefill;
  double decode_s = 0.0;
};

/// Prefills the cache with this rank's shard of 0..N0-1 (q, k, v [B, N_local, *, D] in the
/// compute dtype; o, lse its outputs as for ringattn::forward), then reads positions N0..N-1
/// of the three inputs and decodes them one at a time. Collective; errors are agreed.
DecodeFromResult run_decode_from(Communicator& comm, const AttentionSpec& spec, int64_t decode_from,
                                 int64_t seq_len, const TensorView& q, const TensorView& k,
                                 const TensorView& v, const TensorView* sink_logits,
                                 const TensorView& o, const TensorView& lse,
                                 const std::string* paths, const npy::Header* headers,
                                 int num_threads);

}  // namespace ringattn::launch
