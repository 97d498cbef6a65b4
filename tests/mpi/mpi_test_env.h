#pragma once
/// Shared by the MPI tests: the process's MpiSession, owned by mpi_test_main.cc.

#include "comm/mpi/mpi_session.h"

namespace ringattn {
namespace mpi_test {

/// The session the test main created before running the tests.
const MpiSession& mpi_session();

}  // namespace mpi_test
}  // namespace ringattn
