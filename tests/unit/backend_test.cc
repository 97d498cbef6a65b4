// Backend selection (--backend auto|cpu|cuda): auto falls back to the CPU when no device is
// visible or when the run needs a CPU-only feature; an explicit cuda that cannot run is an error
// naming why.

#include "runtime/src/backend.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "ringattn/config.h"
#include "ringattn/error.h"

namespace ringattn {
namespace {

using ::testing::HasSubstr;

TEST(Backend, ParsesTheThreeNamesAndRejectsOthers) {
  EXPECT_EQ(parse_backend("auto"), Backend::kAuto);
  EXPECT_EQ(parse_backend("cpu"), Backend::kCpu);
  EXPECT_EQ(parse_backend("cuda"), Backend::kCuda);
  for (Backend b : {Backend::kAuto, Backend::kCpu, Backend::kCuda}) {
    EXPECT_EQ(parse_backend(backend_name(b)), b);
  }
  try {
    parse_backend("gpu");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.message(), HasSubstr("unknown backend 'gpu'"));
  }
}

TEST(Backend, CpuIsAlwaysCpu) {
  EXPECT_EQ(select_backend(Backend::kCpu, false), Backend::kCpu);
  EXPECT_EQ(select_backend(Backend::kCpu, false, "the KV cache"), Backend::kCpu);
}

TEST(Backend, AutoTakesTheGpuOnlyWhenOneIsVisible) {
  const Backend expected = cuda_devices() > 0 ? Backend::kCuda : Backend::kCpu;
  EXPECT_EQ(select_backend(Backend::kAuto, false), expected);
  if (!RINGATTN_WITH_CUDA) {
    EXPECT_EQ(cuda_devices(), 0);
  }
}

TEST(Backend, AutoFallsBackToTheCpuForCpuOnlyFeatures) {
  EXPECT_EQ(select_backend(Backend::kAuto, false, "the KV cache"), Backend::kCpu);
}

TEST(Backend, ExplicitCudaThatCannotRunSaysWhy) {
  try {
    select_backend(Backend::kCuda, false, "the KV cache");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_THAT(e.message(), HasSubstr("the KV cache runs on the CPU backend only"));
  }
  if (cuda_devices() > 0) {
    EXPECT_EQ(select_backend(Backend::kCuda, false), Backend::kCuda);
    return;
  }
  try {
    select_backend(Backend::kCuda, false);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_THAT(e.message(),
                HasSubstr(RINGATTN_WITH_CUDA ? "no CUDA device is visible" : "no CUDA support"));
  }
}

}  // namespace
}  // namespace ringattn
