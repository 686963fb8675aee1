// Built only when no CUDA compiler was found: the package works, CUDA features report absent.
#include "kvsched/cuda_runtime_info.h"

namespace kvsched {

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }

}  // namespace kvsched
