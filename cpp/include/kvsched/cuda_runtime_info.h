// What the CUDA side of kvsched can do on this machine. Implemented in cuda/ when the package was
// built with nvcc, and in cpp/src/cuda_runtime_info_absent.cpp otherwise.
#pragma once

namespace kvsched {

// True when the CUDA translation units were compiled into this build.
bool cuda_compiled();

// Number of usable CUDA devices; 0 when no driver, no device, or no CUDA in this build.
int cuda_device_count();

}  // namespace kvsched
