#include "runtime/src/backend.h"

#include <cstdio>

#include "ringattn/config.h"
#include "ringattn/error.h"
#if RINGATTN_WITH_CUDA
#include "kernels/cuda/device.h"
#endif

namespace ringattn {

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

Backend select_backend(Backend requested, bool print_notice, const char* cpu_only) {
  if (requested == Backend::kCpu) return Backend::kCpu;
  if (cpu_only != nullptr) {
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, requested != Backend::kCuda,
                        "--backend cuda: ", cpu_only,
                        " runs on the CPU backend only in this version (use --backend "
                        "cpu)");
    if (print_notice && cuda_devices() > 0) {
      std::fprintf(stderr, "ringattn: %s runs on the CPU only; using the CPU backend\n", cpu_only);
    }
    return Backend::kCpu;
  }
  const int devices = cuda_devices();
  if (requested == Backend::kCuda) {
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, RINGATTN_WITH_CUDA,
                        "--backend cuda: this build has no CUDA support (configure with "
                        "RINGATTN_CUDA=ON)");
    RINGATTN_CHECK_CODE(ErrorCode::kUnsupported, devices > 0,
                        "--backend cuda: no CUDA device is visible to this process");
    return Backend::kCuda;
  }
  if (devices > 0) return Backend::kCuda;
  if (print_notice) {
    std::fprintf(stderr, "ringattn: %s; using the CPU backend\n",
                 RINGATTN_WITH_CUDA ? "no CUDA device found" : "this build has no CUDA support");
  }
  return Backend::kCpu;
}

}  // namespace ringattn
