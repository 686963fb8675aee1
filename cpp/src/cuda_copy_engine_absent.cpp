// The CUDA executor in a build without nvcc: every entry point says so.
#include <stdexcept>

#include "kvsched/cuda_copy_engine.h"

namespace kvsched {
namespace {
[[noreturn]] void no_cuda() { throw std::runtime_error("kvsched was built without CUDA support (no nvcc at build time)"); }
}  // namespace

bool CopyEvent::done() const { no_cuda(); }
void CopyEvent::wait() const { no_cuda(); }
uintptr_t CopyEvent::handle() const { no_cuda(); }
MemoryKind cuda_memory_kind(uintptr_t, int*) { no_cuda(); }
uintptr_t cuda_host_alloc(int64_t) { no_cuda(); }
void cuda_host_free(uintptr_t) { no_cuda(); }
void cuda_host_register(uintptr_t, int64_t) { no_cuda(); }
void cuda_host_unregister(uintptr_t) { no_cuda(); }

struct CudaCopyEngine::Impl {};
CudaCopyEngine::CudaCopyEngine(int device, int64_t staging_bytes, const SwapCostModel& cost,
                               bool batch_staging_copies)
    : device_(device), staging_bytes_(staging_bytes), cost_(cost), batch_staging_copies_(batch_staging_copies) {
  no_cuda();
}
CudaCopyEngine::~CudaCopyEngine() = default;
bool CudaCopyEngine::batched_supported() { return false; }
CopyStrategy CudaCopyEngine::choose(SwapDirection, const int64_t*, size_t, bool, bool) const { no_cuda(); }
CopyEvent CudaCopyEngine::copy(SwapDirection, const int64_t*, size_t, const BufferSpan*, const BufferSpan*, size_t, int,
                               uintptr_t) {
  no_cuda();
}
double CudaCopyEngine::time_copy(SwapDirection, const int64_t*, size_t, const BufferSpan*, const BufferSpan*, size_t, int,
                                 int) {
  no_cuda();
}

}  // namespace kvsched
