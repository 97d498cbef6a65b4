#pragma once
/// ringattn::Error and the RINGATTN_CHECK family of macros.
/// Messages name what was expected and what was found; when the calling thread has a rank
/// (set by the runtime through ScopedRank), what() starts with "[rank r] ".

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace ringattn {

/// What kind of failure an Error reports (also the C ABI's error codes, in this order).
enum class ErrorCode : int {
  kInvalidArgument = 1,
  kUnsupported = 2,
  kCuda = 3,
  kNccl = 4,
  kMpi = 5,
  kIo = 6,
  kInternal = 7,
};

/// Short lower-case name of an error code ("invalid argument", "mpi", ...).
const char* error_code_name(ErrorCode code);

/// The one exception type of the library.
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const { return code_; }
  /// The message without the rank prefix.
  const std::string& message() const { return message_; }

 private:
  ErrorCode code_;
  std::string message_;
};

/// The rank reported in messages raised on this thread (-1: none). Ranks that are threads of
/// one process (the in-process communicator) each set their own.
int current_rank();

/// Sets the calling thread's rank for error messages while it lives.
class ScopedRank {
 public:
  explicit ScopedRank(int rank);
  ~ScopedRank();
  ScopedRank(const ScopedRank&) = delete;
  ScopedRank& operator=(const ScopedRank&) = delete;

 private:
  int previous_;
};

namespace detail {

template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

[[noreturn]] void throw_error(ErrorCode code, const std::string& message);

}  // namespace detail
}  // namespace ringattn

/// Throws ringattn::Error(kInvalidArgument) with the streamed message when cond is false.
#define RINGATTN_CHECK(cond, ...) \
  RINGATTN_CHECK_CODE(::ringattn::ErrorCode::kInvalidArgument, cond, __VA_ARGS__)

/// Throws ringattn::Error(code) with the streamed message when cond is false.
#define RINGATTN_CHECK_CODE(code, cond, ...)                                             \
  do {                                                                                   \
    if (!(cond))                                                                         \
      ::ringattn::detail::throw_error((code), ::ringattn::detail::str_cat(__VA_ARGS__)); \
  } while (0)

/// Throws ringattn::Error(code) unconditionally.
#define RINGATTN_THROW(code, ...) \
  ::ringattn::detail::throw_error((code), ::ringattn::detail::str_cat(__VA_ARGS__))
