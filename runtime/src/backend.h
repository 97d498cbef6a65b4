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

/// Resolves `auto` to a concrete backend: CUDA when this build has it and a device is visible,
/// else the CPU, printing one notice line to stderr when `print_notice`. An explicit `cuda` that
/// cannot run throws Error(kUnsupported) saying why.
/// `cpu_only`, when non-null, names a feature of this run that only the CPU backend has (e.g.
/// "the KV cache (decode)"): auto then resolves to the CPU (with a notice) and an explicit cuda
/// throws Error(kUnsupported) naming it.
Backend select_backend(Backend requested, bool print_notice, const char* cpu_only = nullptr);

}  // namespace ringattn
