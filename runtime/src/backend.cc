#include "runtime/src/backend.h"

#include <cstdio>

#include "ringattn/config.h"
#include "ringattn/error.h"
#if RINGATTN_WITH_CUDA
#include "kernels/cuda/device.h"
#endif

namespace ringattn {

// The CUDA attention kernels are not part of this version: the CUDA build has device discovery
// only, so every run uses the CPU kernels.
constexpr bool kCudaAttentionKernels = false;

Backend parse_backend(const std::string& name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "cpu") return Backend::kCpu;
  if (name == "cuda") return Backend::kCuda;
  RINGATTN_THROW(ErrorCode::kInvalidArgument, "unknown backend '", name,
                 "': expected auto, cpu or cuda");
}

const char* backend_name(Backend backend) {
  switch (backend) {
    case Backend::kAuto:
      return "auto";
    case Backend::kCpu:
      return "cpu";
    case Backend::kCuda:
      return "cuda";
  }
  return "unknown";
}

int cuda_devices() {
#if RINGATTN_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

Backend select_backend(Backend requested, bool print_notice) {
  if (requested == Backend::kCpu) return Backend::kCpu;
  const int devices = cuda_devices();
  if (requested == Backend::kCuda) {
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, RINGATTN_WITH_CUDA,
                        "--backend cuda: this build has no CUDA support (configure with "
                        "RINGATTN_CUDA=ON)");
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, devices > 0,
                        "--backend cuda: no CUDA device is visible to this process");
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, kCudaAttentionKernels,
                        "--backend cuda: the CUDA attention kernels are not in this version");
    return Backend::kCuda;
  }
  if (devices > 0 && kCudaAttentionKernels) return Backend::kCuda;
  if (print_notice && RINGATTN_WITH_CUDA) {
    std::fprintf(
        stderr, "ringattn: %s; using the CPU backend\n",
        devices == 0 ? "no CUDA device found" : "this version has no CUDA attention kernels");
  }
  return Backend::kCpu;
}

}  // namespace ringattn
