#pragma once
/// MpiSession: RAII ownership of MPI initialisation for a program (the launcher, the MPI test
/// main). No mpi.h here, so programs that only hold a session do not see MPI.

#include <optional>

#include "ringattn/error.h"

namespace ringattn {

/// Thread support level MPI provided (MPI_THREAD_SINGLE .. MPI_THREAD_MULTIPLE).
enum class MpiThreadLevel : int { kSingle = 0, kFunneled = 1, kSerialized = 2, kMultiple = 3 };

/// Initialises MPI with MPI_Init_thread (MPI_THREAD_MULTIPLE requested; what was provided is
/// recorded) and finalises it on destruction. If MPI was already initialised (e.g. by mpi4py
/// in the Python binding) the session adopts it and leaves finalisation to its owner. While
/// it lives, the constructing thread's error messages carry "[rank r] " (ScopedRank).
/// One session per process; create it before any MpiCommunicator.
class MpiSession {
 public:
  /// MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE); argc/argv may be null. Also finds the
  /// node-local rank with MPI_Comm_split_type(MPI_COMM_TYPE_SHARED). Throws Error(kMpi).
  explicit MpiSession(int* argc = nullptr, char*** argv = nullptr);
  /// MPI_Finalize unless MPI is already finalised or this session did not initialise it.
  /// Never throws.
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  /// Rank in MPI_COMM_WORLD.
  int world_rank() const { return world_rank_; }
  /// Size of MPI_COMM_WORLD.
  int world_size() const { return world_size_; }
  /// Rank among the processes of this node (shared-memory domain): the GPU index to use.
  int local_rank() const { return local_rank_; }
  /// Number of processes on this node.
  int local_size() const { return local_size_; }
  /// Thread support MPI provided (may be below kMultiple).
  MpiThreadLevel thread_level() const { return thread_level_; }
  /// Whether this session called MPI_Init_thread (and so will call MPI_Finalize).
  bool owns_mpi() const { return owns_mpi_; }
  /// MPI_Abort(MPI_COMM_WORLD, code): terminates every rank of the job. For the top-level
  /// error handler of a program only; the library itself never aborts.
  [[noreturn]] void abort(int code) const;

 private:
  int world_rank_ = 0;
  int world_size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
  MpiThreadLevel thread_level_ = MpiThreadLevel::kSingle;
  bool owns_mpi_ = false;
  std::optional<ScopedRank> scoped_rank_;
};

}  // namespace ringattn
