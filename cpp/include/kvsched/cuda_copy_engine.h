// The CUDA executor for swap plans: runs a plan's byte descriptors between device memory and pinned
// host memory, asynchronously on a caller-given stream. Implemented in cuda/cuda_copy_engine.cu;
// without nvcc every entry point throws std::runtime_error (cpp/src/cuda_copy_engine_absent.cpp).
//
// Strategies (CopyStrategy in swap_planner.h):
//   kPerDescriptor  one cudaMemcpyAsync per descriptor: the baseline, best for few large pieces.
//   kBatched        one cudaMemcpyBatchAsync for all of them (CUDA runtime >= 12.8; not on the
//                   legacy default stream 0).
//   kGatherKernel   swap-out: a kernel gathers the fragmented device pieces into a device staging
//                   buffer, then one copy per run that is contiguous on the host side; swap-in: the
//                   reverse (large copies in, then a scatter kernel). Kernels overlap copies through
//                   two staging slots (kvsched/staging_plan.h). Needs 16-byte aligned offsets and sizes.
// Automatic choice takes the cheapest strategy under the engine's SwapCostModel (calibrate it).
//
// Stream handles are passed as integers (cudaStream_t values; 0 is the legacy default stream) so
// that this header needs no CUDA include.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvsched/copy_descriptors.h"
#include "kvsched/swap_planner.h"

namespace kvsched {

// Completion of an enqueued copy: an event recorded on the stream after its last operation.
class CopyEvent {
 public:
  bool done() const;  // cudaEventQuery
  void wait() const;  // cudaEventSynchronize
  uintptr_t handle() const;  // the cudaEvent_t, for cudaStreamWaitEvent in the engine's own code

 private:
  friend class CudaCopyEngine;
  std::shared_ptr<void> event_;
};

// Where a pointer lives, as the CUDA runtime sees it.
enum class MemoryKind : int { kPageable = 0, kPinnedHost = 1, kDevice = 2, kManaged = 3 };
MemoryKind cuda_memory_kind(uintptr_t ptr, int* device);

// Pinned host memory: cudaHostAlloc'd buffers, or registration of an existing (numpy) buffer.
uintptr_t cuda_host_alloc(int64_t nbytes);
void cuda_host_free(uintptr_t ptr);
void cuda_host_register(uintptr_t ptr, int64_t nbytes);
void cuda_host_unregister(uintptr_t ptr);

class CudaCopyEngine {
 public:
  // `staging_bytes`: the gather strategy's device staging buffer, per direction (allocated on first
  // use; two slots, so that kernels overlap copies). `batch_staging_copies`: that strategy issues a
  // chunk's host runs as one cudaMemcpyBatchAsync where the runtime has it (else one call per run).
  CudaCopyEngine(int device, int64_t staging_bytes, const SwapCostModel& cost, bool batch_staging_copies = true);
  ~CudaCopyEngine();
  CudaCopyEngine(const CudaCopyEngine&) = delete;
  CudaCopyEngine& operator=(const CudaCopyEngine&) = delete;

  int device() const { return device_; }
  static bool batched_supported();  // compiled against and running on a runtime with cudaMemcpyBatchAsync
  void set_cost_model(const SwapCostModel& cost) { cost_ = cost; }
  const SwapCostModel& cost_model() const { return cost_; }
  // The strategy copy() takes with strategy < 0, among those allowed (the gather kernel needs
  // 16-byte alignment; cudaMemcpyBatchAsync a runtime that has it and a stream other than 0).
  CopyStrategy choose(SwapDirection direction, const int64_t* descriptors, size_t count, bool batched_ok = true,
                      bool gather_ok = true) const;

  // Checks everything (descriptors against buffers, the device side on this engine's device, the
  // host side pinned), then enqueues the copies on `stream` and returns their completion event.
  // direction kOut: src = device tensors, dst = host tensors; kIn: the reverse.
  CopyEvent copy(SwapDirection direction, const int64_t* descriptors, size_t count, const BufferSpan* src,
                 const BufferSpan* dst, size_t num_tensors, int strategy, uintptr_t stream);
  // copy() `repeats` times, synchronously, timed with CUDA events; returns the median seconds.
  double time_copy(SwapDirection direction, const int64_t* descriptors, size_t count, const BufferSpan* src,
                   const BufferSpan* dst, size_t num_tensors, int strategy, int repeats);

 private:
  struct Impl;
  int device_;
  int64_t staging_bytes_;
  SwapCostModel cost_;
  bool batch_staging_copies_ = true;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvsched
