#pragma once
/// CUDA device discovery for host code (no CUDA types in this header). Built only when
/// RINGATTN_WITH_CUDA; never throws: a missing driver or device reads as zero devices.

#include <string>

namespace ringattn::cuda {

/// Number of usable CUDA devices; 0 when the driver or a device is missing.
int device_count();

/// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" for device i, or the CUDA error text.
std::string device_description(int device);

}  // namespace ringattn::cuda
