// GoogleTest main for the MPI tests: owns the MpiSession, prints results on rank 0 only (other
// ranks print just their failures, prefixed with their rank), and allreduces the failure count
// so every rank exits non-zero when any rank failed.

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <exception>
#include <memory>

#include "comm/mpi/mpi_session.h"
#include "tests/mpi/mpi_test_env.h"

namespace ringattn {
namespace mpi_test {
namespace {

const MpiSession* g_session = nullptr;

// Replaces the default printer on ranks other than 0: silent unless something fails.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}

  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 result.file_name() ? result.file_name() : "unknown", result.line_number(),
                 result.message());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
    }
  }

 private:
  int rank_;
};

}  // namespace

const MpiSession& mpi_session() { return *g_session; }

}  // namespace mpi_test
}  // namespace ringattn

int main(int argc, char** argv) {
  std::unique_ptr<ringattn::MpiSession> session;
  try {
    session = std::make_unique<ringattn::MpiSession>(&argc, &argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn_mpi_tests: %s\n", e.what());
    return 1;
  }
  ringattn::mpi_test::g_session = session.get();
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = session->world_rank();
  if (rank != 0) {
    ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new ringattn::mpi_test::FailurePrinter(rank));
  }
  const int local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int failed_ranks = local_failed;
  if (MPI_Allreduce(&local_failed, &failed_ranks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD) !=
      MPI_SUCCESS) {
    std::fprintf(stderr, "[rank %d] ringattn_mpi_tests: MPI_Allreduce of the result failed\n",
                 rank);
    session->abort(1);
  }
  if (rank == 0) {
    std::printf("ringattn_mpi_tests: %d of %d rank(s) failed\n", failed_ranks,
                session->world_size());
  }
  return failed_ranks == 0 ? 0 : 1;
}
