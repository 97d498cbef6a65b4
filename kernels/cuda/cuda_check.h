#pragma once
// CUDA return-code checks for .cu files: every failure becomes ringattn::Error(kCuda) naming
// the call and CUDA's error text. Internal to kernels/cuda.

#include <cuda_runtime.h>

#include "ringattn/error.h"

#define RINGATTN_CUDA_CHECK(call)                                                             \
  do {                                                                                        \
    const cudaError_t ringattn_rc_ = (call);                                                  \
    if (ringattn_rc_ != cudaSuccess)                                                          \
      ::ringattn::detail::throw_error(                                                        \
          ::ringattn::ErrorCode::kCuda,                                                       \
          ::ringattn::detail::str_cat(#call, " failed: ", cudaGetErrorString(ringattn_rc_))); \
  } while (0)

// After a kernel launch: launch-configuration errors surface here (execution errors at the
// next synchronising call).
#define RINGATTN_CUDA_CHECK_LAUNCH(what) RINGATTN_CUDA_CHECK(cudaGetLastError())
