#include "ringattn/error.h"

namespace ringattn {
namespace {
thread_local int tls_rank = -1;

std::string with_rank(const std::string& message) {
  if (tls_rank < 0) return message;
  return "[rank " + std::to_string(tls_rank) + "] " + message;
}
}  // namespace

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return "invalid argument";
    case ErrorCode::kUnsupported:
      return "unsupported";
    case ErrorCode::kCuda:
      return "cuda";
    case ErrorCode::kNccl:
      return "nccl";
    case ErrorCode::kMpi:
      return "mpi";
    case ErrorCode::kIo:
      return "io";
    case ErrorCode::kInternal:
      return "internal";
  }
  return "unknown";
}

Error::Error(ErrorCode code, const std::string& message)
    : std::runtime_error(with_rank(message)), code_(code), message_(message) {}

int current_rank() { return tls_rank; }

ScopedRank::ScopedRank(int rank) : previous_(tls_rank) { tls_rank = rank; }
ScopedRank::~ScopedRank() { tls_rank = previous_; }

namespace detail {
void throw_error(ErrorCode code, const std::string& message) { throw Error(code, message); }
}  // namespace detail
}  // namespace ringattn
