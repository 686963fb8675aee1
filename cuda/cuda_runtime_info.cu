// Device probe for kvsched.has_cuda(). Linked with the static CUDA runtime, which loads the driver
// lazily: on a machine without a driver or a GPU the probe returns 0 instead of failing to load.
#include <cuda_runtime_api.h>

#include "kvsched/cuda_runtime_info.h"

namespace kvsched {

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later CUDA calls start clean
    return 0;
  }
  return count;
}

}  // namespace kvsched
