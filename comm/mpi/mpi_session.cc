#include "comm/mpi/mpi_session.h"

#include <mpi.h>

#include <cstdlib>

#include "comm/mpi/mpi_communicator.h"

namespace ringattn {
namespace {

MpiThreadLevel to_thread_level(int provided) {
  if (provided >= MPI_THREAD_MULTIPLE) return MpiThreadLevel::kMultiple;
  if (provided >= MPI_THREAD_SERIALIZED) return MpiThreadLevel::kSerialized;
  if (provided >= MPI_THREAD_FUNNELED) return MpiThreadLevel::kFunneled;
  return MpiThreadLevel::kSingle;
}

}  // namespace

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  RINGATTN_CHECK_CODE(ErrorCode::kMpi, !finalized,
                      "MpiSession: expected MPI not yet finalised, found it finalised (MPI "
                      "cannot be initialised twice in one process)");
  int provided = MPI_THREAD_SINGLE;
  if (initialized) {
    check_mpi(MPI_Query_thread(&provided), "MPI_Query_thread");
  } else {
    check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread");
    owns_mpi_ = true;
  }
  thread_level_ = to_thread_level(provided);
  try {
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(MPI_COMM_WORLD, &world_size_), "MPI_Comm_size");
    // Processes that share memory are the processes of one node; keying by world rank keeps
    // local ranks in world order.
    MPI_Comm node = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank_, MPI_INFO_NULL,
                                  &node),
              "MPI_Comm_split_type", "MPI_COMM_TYPE_SHARED");
    const int rank_rc = MPI_Comm_rank(node, &local_rank_);
    const int size_rc = MPI_Comm_size(node, &local_size_);
    MPI_Comm_free(&node);
    check_mpi(rank_rc, "MPI_Comm_rank", "node communicator");
    check_mpi(size_rc, "MPI_Comm_size", "node communicator");
  } catch (...) {
    if (owns_mpi_) MPI_Finalize();
    throw;
  }
  scoped_rank_.emplace(world_rank_);
}

MpiSession::~MpiSession() {
  scoped_rank_.reset();
  if (!owns_mpi_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiSession::abort(int code) const {
  MPI_Abort(MPI_COMM_WORLD, code);
  // MPI_Abort does not return in practice; if an implementation does, still honour
  // [[noreturn]] by ending this process.
  std::abort();
}

}  // namespace ringattn
