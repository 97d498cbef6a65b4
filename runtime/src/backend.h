#pragma once
/// Backend selection (--backend auto|cpu|cuda).

#include <string>

namespace ringattn {

enum class Backend { kAuto, kCpu, kCuda };

/// Parses "auto" | "cpu" | "cuda"; throws Error otherwise.
Backend parse_backend(const std::string& name);
const char* backend_name(Backend backend);

/// Number of CUDA devices this process can use (0 in a build without CUDA).
int cuda_devices();

/// Resolves `auto` to a concrete backend. auto uses CUDA only where this build has the CUDA
/// attention kernels and a device is present; otherwise it falls back to the CPU, printing one
/// notice line to stderr when `print_notice`. An explicit `cuda` that cannot run throws
/// Error(kUnsupported) saying why.
Backend select_backend(Backend requested, bool print_notice);

}  // namespace ringattn
