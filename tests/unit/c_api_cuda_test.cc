// The C ABI's CUDA entry points on any machine: ringattn_comm_create_nccl returns a status
// (RINGATTN_ERROR_UNSUPPORTED with a message naming the cause in a build without NCCL or on a
// machine without a GPU; a working one-rank communicator on a GPU machine) and never crashes,
// and ringattn_comm_device tells host communicators (-1) from device ones.
//
// Unit tests never initialise MPI in the test process (c_api_test.cc relies on it), but
// ringattn_comm_create_nccl must (it is a collective over MPI_COMM_WORLD): that call runs in a
// death-test child, a fresh process re-executed by GoogleTest, as a one-rank MPI singleton.

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "ringattn/config.h"
#include "ringattn/ringattn.h"
#if RINGATTN_WITH_CUDA
#include "kernels/cuda/device.h"
#endif

namespace ringattn {
namespace {

int visible_devices() {
#if RINGATTN_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

// The child's body: create, report on stderr, free, finalise MPI, exit with the status code.
[[noreturn]] void create_nccl_report_and_exit() {
  ringattn_comm* comm = nullptr;
  const ringattn_status status = ringattn_comm_create_nccl(&comm);
  std::fprintf(stderr, "status %s: %s\n", ringattn_status_name(status), ringattn_last_error());
  if (status == RINGATTN_OK) {
    int device = -2, size = 0;
    const bool ok = ringattn_comm_device(comm, &device) == RINGATTN_OK &&
                    ringattn_comm_size(comm, &size) == RINGATTN_OK;
    std::fprintf(stderr, "%s: device %d, size %d, name %s\n", ok ? "queried" : "query failed",
                 device, size, ringattn_comm_name(comm));
    ringattn_comm_destroy(comm);
  } else if (comm != nullptr) {
    std::fprintf(stderr, "a failed create left a handle\n");
  }
  ringattn_mpi_finalize();
  std::fflush(stderr);
  std::_Exit(static_cast<int>(status));
}

TEST(CApiCudaTest, CreateNcclReturnsAStatusAndNeverCrashes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // a fresh process: MPI starts clean there
  if (!RINGATTN_WITH_NCCL) {
    EXPECT_EXIT(
        create_nccl_report_and_exit(), ::testing::ExitedWithCode(RINGATTN_ERROR_UNSUPPORTED),
        "status unsupported: ringattn_comm_create_nccl: this build of ringattn has no NCCL");
  } else if (visible_devices() == 0) {
    // The agreed device check of make_nccl_communicator, before NCCL is touched.
    EXPECT_EXIT(create_nccl_report_and_exit(),
                ::testing::ExitedWithCode(RINGATTN_ERROR_UNSUPPORTED),
                "status unsupported: .*no CUDA device");
  } else {
    EXPECT_EXIT(create_nccl_report_and_exit(), ::testing::ExitedWithCode(RINGATTN_OK),
                "status ok: .*queried: device 0, size 1, name nccl");
  }
}

TEST(CApiCudaTest, CreateNcclChecksItsArgumentFirst) {
  // A null out-pointer is refused before MPI or CUDA is touched (so in this process).
  EXPECT_EQ(ringattn_comm_create_nccl(nullptr), RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("out"), std::string::npos)
      << ringattn_last_error();
}

TEST(CApiCudaTest, HostCommunicatorsHaveNoDevice) {
  ringattn_comm* comm = nullptr;
  ASSERT_EQ(ringattn_comm_create_self(&comm), RINGATTN_OK);
  int device = 7;
  EXPECT_EQ(ringattn_comm_device(comm, &device), RINGATTN_OK);
  EXPECT_EQ(device, -1);
  EXPECT_STREQ(ringattn_comm_name(comm), "inproc");
  EXPECT_EQ(ringattn_comm_device(comm, nullptr), RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(ringattn_comm_device(nullptr, &device), RINGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ringattn_last_error()).find("communicator"), std::string::npos)
      << ringattn_last_error();
  EXPECT_EQ(ringattn_comm_destroy(comm), RINGATTN_OK);
}

}  // namespace
}  // namespace ringattn
