#include "launch/sharded_io.h"

#include <algorithm>
#include <cstdio>
#include <limits>

#include "ringattn/error.h"

namespace ringattn::launch {
namespace {

// MPI counts are ints: move at most 1 GiB per call.
constexpr int64_t kMaxChunk = int64_t{1} << 30;

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return std::string(text, static_cast<size_t>(len));
}

#define RINGATTN_MPIIO(call, ...)                                                          \
  do {                                                                                     \
    const int rc_ = (call);                                                                \
    RINGATTN_CHECK_CODE(::ringattn::ErrorCode::kIo, rc_ == MPI_SUCCESS, __VA_ARGS__, ": ", \
                        mpi_error_string(rc_));                                            \
  } while (0)

void read_bytes(MPI_File fh, const std::string& path, MPI_Offset offset, char* dst, int64_t bytes) {
  while (bytes > 0) {
    const int n = static_cast<int>(std::min(bytes, kMaxChunk));
    MPI_Status status;
    RINGATTN_MPIIO(MPI_File_read_at(fh, offset, dst, n, MPI_BYTE, &status), path, ": read of ", n,
                   " bytes at offset ", offset, " failed");
    int got = 0;
    MPI_Get_count(&status, MPI_BYTE, &got);
    RINGATTN_CHECK_CODE(ErrorCode::kIo, got == n, path, ": file is shorter than its header says (",
                        "wanted ", n, " bytes at offset ", offset, ", got ", got, ")");
    offset += n;
    dst += n;
    bytes -= n;
  }
}

int64_t inner_size(const npy::Header& h) {
  int64_t inner = 1;
  for (size_t i = 2; i < h.shape.size(); ++i) inner *= h.shape[i];
  return inner;
}

}  // namespace

void read_token_shard(const std::string& path, const npy::Header& header, const Shard& shard,
                      float* dst) {
  RINGATTN_CHECK(header.shape.size() >= 2, path, ": expected [B, N, ...], got ",
                 header.shape_string());
  const int64_t batch = header.shape[0], seq_len = header.shape[1];
  const int64_t inner = inner_size(header);
  MPI_File fh = MPI_FILE_NULL;
  RINGATTN_MPIIO(MPI_File_open(MPI_COMM_SELF, path.c_str(), MPI_MODE_RDONLY, MPI_INFO_NULL, &fh),
                 path, ": cannot open for reading");
  try {
    int64_t local = 0;
    for (const PosRange& run : shard.runs) {
      for (int64_t b = 0; b < batch; ++b) {
        const MPI_Offset off = static_cast<MPI_Offset>(header.data_offset) +
                               static_cast<MPI_Offset>((b * seq_len + run.begin) * inner * 4);
        float* out = dst + (b * shard.size() + local) * inner;
        read_bytes(fh, path, off, reinterpret_cast<char*>(out), run.size() * inner * 4);
      }
      local += run.size();
    }
  } catch (...) {
    MPI_File_close(&fh);
    throw;
  }
  MPI_File_close(&fh);
}

std::vector<float> read_small(const std::string& path, const npy::Header& header) {
  std::vector<float> out(static_cast<size_t>(header.numel()));
  MPI_File fh = MPI_FILE_NULL;
  RINGATTN_MPIIO(MPI_File_open(MPI_COMM_SELF, path.c_str(), MPI_MODE_RDONLY, MPI_INFO_NULL, &fh),
                 path, ": cannot open for reading");
  try {
    read_bytes(fh, path, static_cast<MPI_Offset>(header.data_offset),
               reinterpret_cast<char*>(out.data()), header.numel() * 4);
  } catch (...) {
    MPI_File_close(&fh);
    throw;
  }
  MPI_File_close(&fh);
  return out;
}

ShardedOutput::ShardedOutput(MPI_Comm comm, std::string path, std::vector<int64_t> shape)
    : comm_(comm), path_(std::move(path)), partial_(path_ + ".partial") {
  MPI_Comm_rank(comm_, &rank_);
  const std::string header = npy::format_header(shape);
  data_offset_ = header.size();
  if (rank_ == 0) std::remove(partial_.c_str());  // a stale partial from an aborted run
  MPI_Barrier(comm_);
  RINGATTN_MPIIO(MPI_File_open(comm_, partial_.c_str(), MPI_MODE_CREATE | MPI_MODE_WRONLY,
                               MPI_INFO_NULL, &file_),
                 path_, ": cannot create output");
  if (rank_ == 0) {
    MPI_Status status;
    RINGATTN_MPIIO(MPI_File_write_at(file_, 0, header.data(), static_cast<int>(header.size()),
                                     MPI_BYTE, &status),
                   path_, ": cannot write the header");
  }
}

ShardedOutput::~ShardedOutput() {
  if (file_ != MPI_FILE_NULL) MPI_File_close(&file_);
}

void ShardedOutput::write(int64_t offset, const float* src, int64_t count) {
  MPI_Offset off = static_cast<MPI_Offset>(data_offset_) + static_cast<MPI_Offset>(offset) * 4;
  const char* p = reinterpret_cast<const char*>(src);
  int64_t bytes = count * 4;
  while (bytes > 0) {
    const int n = static_cast<int>(std::min(bytes, kMaxChunk));
    MPI_Status status;
    RINGATTN_MPIIO(MPI_File_write_at(file_, off, p, n, MPI_BYTE, &status), path_, ": write of ", n,
                   " bytes at offset ", off, " failed");
    off += n;
    p += n;
    bytes -= n;
  }
}

void ShardedOutput::close() {
  if (file_ != MPI_FILE_NULL) {
    RINGATTN_MPIIO(MPI_File_close(&file_), path_, ": close failed");
  }
}

void ShardedOutput::commit() {
  if (rank_ != 0) return;
  RINGATTN_CHECK_CODE(ErrorCode::kIo, std::rename(partial_.c_str(), path_.c_str()) == 0, path_,
                      ": cannot rename the finished output into place");
}

void ShardedOutput::discard() noexcept {
  if (file_ != MPI_FILE_NULL) MPI_File_close(&file_);
  if (rank_ == 0) std::remove(partial_.c_str());
}

void write_token_shard(ShardedOutput& out, int64_t batch, int64_t seq_len, int64_t inner,
                       const Shard& shard, const float* src) {
  int64_t local = 0;
  for (const PosRange& run : shard.runs) {
    for (int64_t b = 0; b < batch; ++b) {
      out.write((b * seq_len + run.begin) * inner, src + (b * shard.size() + local) * inner,
                run.size() * inner);
    }
    local += run.size();
  }
}

void write_row_shard(ShardedOutput& out, int64_t batch, int64_t heads, int64_t seq_len,
                     const Shard& shard, const float* src) {
  int64_t local = 0;
  for (const PosRange& run : shard.runs) {
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        out.write((b * heads + h) * seq_len + run.begin,
                  src + (b * heads + h) * shard.size() + local, run.size());
      }
    }
    local += run.size();
  }
}

}  // namespace ringattn::launch
