#pragma once
/// Sharded .npy I/O with MPI-IO: each rank reads only its own tokens of a whole-sequence
/// input and writes only its own part of each output, so no rank ever holds the whole
/// sequence. Outputs are written to "<path>.partial" and renamed into place only once every
/// rank has succeeded, so a failure never leaves a partial file under the requested name.

#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/src/npy.h"
#include "runtime/src/sharding.h"

namespace ringattn::launch {

/// Reads the tokens of `shard` from a [B, N, inner...] f32 .npy into dst laid out as
/// [B, shard.size(), inner] (inner = product of the dimensions after N). Independent I/O.
void read_token_shard(const std::string& path, const npy::Header& header, const Shard& shard,
                      float* dst);

/// Reads a whole small f32 .npy (e.g. sink logits [H]) on this rank.
std::vector<float> read_small(const std::string& path, const npy::Header& header);

/// One output .npy written by every rank of `comm`. Collective constructor and close().
class ShardedOutput {
 public:
  /// Creates "<path>.partial" (collective), rank 0 writes the header for `shape` (f32).
  ShardedOutput(MPI_Comm comm, std::string path, std::vector<int64_t> shape);
  ~ShardedOutput();
  ShardedOutput(const ShardedOutput&) = delete;
  ShardedOutput& operator=(const ShardedOutput&) = delete;

  /// Writes `count` f32 elements at element offset `offset` of the array (independent).
  void write(int64_t offset, const float* src, int64_t count);
  /// Closes the file (collective).
  void close();
  /// Rank 0 renames "<path>.partial" to path. Call only after every rank succeeded.
  void commit();
  /// Rank 0 removes "<path>.partial" (after a failure anywhere). Never throws.
  void discard() noexcept;

  const std::string& path() const { return path_; }

 private:
  MPI_Comm comm_;
  std::string path_, partial_;
  size_t data_offset_ = 0;
  MPI_File file_ = MPI_FILE_NULL;
  int rank_ = 0;
};

/// Writes this rank's tokens of a [B, N, inner] array: src is [B, shard.size(), inner].
void write_token_shard(ShardedOutput& out, int64_t batch, int64_t seq_len, int64_t inner,
                       const Shard& shard, const float* src);

/// Writes this rank's part of a [B, H, N] array (lse): src is [B, H, shard.size()].
void write_row_shard(ShardedOutput& out, int64_t batch, int64_t heads, int64_t seq_len,
                     const Shard& shard, const float* src);

}  // namespace ringattn::launch
