// CUDA executor for swap plans (see kvsched/cuda_copy_engine.h for the strategies).
//
// The gather/scatter strategy runs a StagingPlan (kvsched/staging_plan.h: pieces, chunks, slots,
// host runs) on two streams: the caller's stream runs the kernels, a copy stream of the engine's
// runs the PCIe copies, and per-slot events hand each staging slot back and forth, so that the
// kernel of chunk k+1 overlaps the copies of chunk k.
//
//   swap-out, chunk k in slot s:  caller: [wait slot s free] gather k -> ready[s]
//                                 copy:   [wait ready[s]]   D2H runs of k -> free[s]
//   swap-in,  chunk k in slot s:  copy:   [wait slot s free] H2D runs of k -> ready[s]
//                                 caller: [wait ready[s]]   scatter k -> free[s]
//
// Each direction has its own lane (staging, copy stream, piece table, events), so a swap-out and a
// swap-in on two streams use both PCIe directions at once. Calls on one lane are serialized by its
// mutex and ordered on the device by its events, whatever streams they come on.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "kvsched/cuda_copy_engine.h"
#include "kvsched/errors.h"
#include "kvsched/staging_plan.h"

namespace kvsched {
namespace {

constexpr int kCopyThreads = 256;

void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear a sticky launch error so later calls start clean
    throw std::runtime_error(detail::concat(what, ": ", cudaGetErrorName(error), ": ", cudaGetErrorString(error)));
  }
}

// Copies gathered for one cudaMemcpyBatchAsync (CUDA 12.8+; never on the legacy default stream).
struct CopyBatch {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;

  void clear() {
    dsts.clear();
    srcs.clear();
    sizes.clear();
  }
  void add(void* dst, const void* src, size_t nbytes) {
    dsts.push_back(dst);
    srcs.push_back(src);
    sizes.push_back(nbytes);
  }
  void enqueue(cudaStream_t stream) {
    if (sizes.empty()) return;
#if CUDART_VERSION >= 12080
    cudaMemcpyAttributes attributes{};
    attributes.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attribute_index = 0;
#if CUDART_VERSION >= 13000
    check_cuda(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attributes,
                                    &attribute_index, 1, stream),
               "cudaMemcpyBatchAsync");
#else
    size_t fail_index = 0;
    check_cuda(cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), sizes.size(),
                                    &attributes, &attribute_index, 1, &fail_index, stream),
               "cudaMemcpyBatchAsync");
#endif
#else
    (void)stream;
    throw std::logic_error("cudaMemcpyBatchAsync: not in this CUDA runtime");
#endif
  }
};

// One thread block per piece; 16-byte loads and stores (pieces are 16-byte aligned).
__global__ void copy_pieces(const StagingPiece* pieces) {
  const StagingPiece piece = pieces[blockIdx.x];
  const uint4* src = reinterpret_cast<const uint4*>(piece.src);
  uint4* dst = reinterpret_cast<uint4*>(piece.dst);
  const unsigned long long count = piece.nbytes / 16;
  for (unsigned long long i = threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
}

std::shared_ptr<void> make_event(unsigned flags) {
  cudaEvent_t event = nullptr;
  check_cuda(cudaEventCreateWithFlags(&event, flags), "cudaEventCreateWithFlags");
  return std::shared_ptr<void>(event, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
}

cudaEvent_t as_event(const std::shared_ptr<void>& event) { return static_cast<cudaEvent_t>(event.get()); }

bool aligned16(const int64_t* descriptors, size_t count, const BufferSpan* src, const BufferSpan* dst) {
  for (size_t i = 0; i < count; ++i) {
    const int64_t* d = descriptors + 4 * i;
    if (((src[d[0]].ptr + static_cast<uintptr_t>(d[1])) | (dst[d[0]].ptr + static_cast<uintptr_t>(d[2])) |
         static_cast<uintptr_t>(d[3])) % 16 != 0) {
      return false;
    }
  }
  return true;
}

// The gather/scatter state of one direction.
struct Lane {
  std::mutex mutex;
  void* staging = nullptr;
  cudaStream_t copy_stream = nullptr;
  StagingPiece* host_pieces = nullptr;  // pinned; uploaded at the start of each call
  StagingPiece* device_pieces = nullptr;
  size_t piece_capacity = 0;
  std::shared_ptr<void> entry, pieces_uploaded, last_kernel;
  std::shared_ptr<void> ready[kStagingSlots], free_slot[kStagingSlots];
  bool used = false;
  bool slot_used[kStagingSlots] = {};
  StagingPlan plan;
  CopyBatch batch;

  void init() {
    entry = make_event(cudaEventDisableTiming);
    pieces_uploaded = make_event(cudaEventDisableTiming);
    last_kernel = make_event(cudaEventDisableTiming);
    for (int s = 0; s < kStagingSlots; ++s) {
      ready[s] = make_event(cudaEventDisableTiming);
      free_slot[s] = make_event(cudaEventDisableTiming);
    }
  }

  ~Lane() {
    if (used) {
      cudaEventSynchronize(as_event(last_kernel));
      for (int s = 0; s < kStagingSlots; ++s) {
        if (slot_used[s]) cudaEventSynchronize(as_event(free_slot[s]));
      }
    }
    if (copy_stream) cudaStreamDestroy(copy_stream);
    cudaFree(staging);
    cudaFree(device_pieces);
    cudaFreeHost(host_pieces);
  }

  void reserve(int64_t staging_bytes, size_t num_pieces) {
    if (staging == nullptr) {
      check_cuda(cudaMalloc(&staging, static_cast<size_t>(staging_bytes)), "cudaMalloc (staging)");
    }
    if (copy_stream == nullptr) {
      check_cuda(cudaStreamCreateWithFlags(&copy_stream, cudaStreamNonBlocking), "cudaStreamCreate (copy stream)");
    }
    if (num_pieces <= piece_capacity) return;
    if (used) check_cuda(cudaEventSynchronize(as_event(last_kernel)), "cudaEventSynchronize");
    const size_t capacity = std::max(num_pieces, 2 * piece_capacity);
    check_cuda(cudaFree(device_pieces), "cudaFree");
    check_cuda(cudaFreeHost(host_pieces), "cudaFreeHost");
    device_pieces = nullptr;
    host_pieces = nullptr;
    piece_capacity = 0;
    check_cuda(cudaMalloc(&device_pieces, capacity * sizeof(StagingPiece)), "cudaMalloc (piece table)");
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_pieces), capacity * sizeof(StagingPiece),
                             cudaHostAllocDefault),
               "cudaHostAlloc (piece table)");
    piece_capacity = capacity;
  }

  // Enqueues the plan already built in `plan`; see the diagram at the top of this file.
  // batch_runs: a chunk's host runs go out as one cudaMemcpyBatchAsync instead of one
  // cudaMemcpyAsync each (fewer calls where the host side is broken into many runs).
  void run(bool out, cudaStream_t stream, bool batch_runs) {
    const auto staging_base = reinterpret_cast<uintptr_t>(staging);
    const cudaMemcpyKind kind = out ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
    // The previous call's upload must be done before the pinned table is rewritten, and its kernels
    // before the device table is.
    if (used) {
      check_cuda(cudaEventSynchronize(as_event(pieces_uploaded)), "cudaEventSynchronize");
      check_cuda(cudaStreamWaitEvent(stream, as_event(last_kernel), 0), "cudaStreamWaitEvent");
    }
    std::copy(plan.pieces.begin(), plan.pieces.end(), host_pieces);
    check_cuda(cudaMemcpyAsync(device_pieces, host_pieces, plan.pieces.size() * sizeof(StagingPiece),
                               cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync (piece table)");
    check_cuda(cudaEventRecord(as_event(pieces_uploaded), stream), "cudaEventRecord");
    // The copy stream starts after everything the caller queued before (the host side may be the
    // target or source of earlier work on the caller's stream).
    check_cuda(cudaEventRecord(as_event(entry), stream), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(copy_stream, as_event(entry), 0), "cudaStreamWaitEvent");
    auto copy_runs = [&](const StagingChunk& c) {
      batch.clear();
      for (size_t r = c.run_begin; r < c.run_end; ++r) {
        const StagingRun& run = plan.runs[r];
        void* staged = reinterpret_cast<void*>(staging_base + static_cast<uintptr_t>(run.staging_offset));
        void* host = reinterpret_cast<void*>(run.host);
        if (batch_runs) {
          batch.add(out ? host : staged, out ? staged : host, static_cast<size_t>(run.nbytes));
        } else {
          check_cuda(cudaMemcpyAsync(out ? host : staged, out ? staged : host, static_cast<size_t>(run.nbytes), kind,
                                     copy_stream),
                     "cudaMemcpyAsync (staging)");
        }
      }
      batch.enqueue(copy_stream);
    };
    auto launch = [&](const StagingChunk& c) {
      copy_pieces<<<static_cast<unsigned>(c.piece_end - c.piece_begin), kCopyThreads, 0, stream>>>(device_pieces +
                                                                                                   c.piece_begin);
      check_cuda(cudaGetLastError(), out ? "gather kernel launch" : "scatter kernel launch");
    };
    // Out: the kernel fills a slot on the caller's stream and the copy stream drains it to the host;
    // in: the copy stream fills it from the host and the scatter kernel drains it.
    cudaStream_t fill = out ? stream : copy_stream, drain = out ? copy_stream : stream;
    for (const StagingChunk& c : plan.chunks) {
      cudaEvent_t ready_event = as_event(ready[c.slot]), free_event = as_event(free_slot[c.slot]);
      if (slot_used[c.slot]) check_cuda(cudaStreamWaitEvent(fill, free_event, 0), "cudaStreamWaitEvent");
      out ? launch(c) : copy_runs(c);
      check_cuda(cudaEventRecord(ready_event, fill), "cudaEventRecord");
      check_cuda(cudaStreamWaitEvent(drain, ready_event, 0), "cudaStreamWaitEvent");
      out ? copy_runs(c) : launch(c);
      check_cuda(cudaEventRecord(free_event, drain), "cudaEventRecord");
      slot_used[c.slot] = true;
    }
    check_cuda(cudaEventRecord(as_event(last_kernel), stream), "cudaEventRecord");
    if (out && !plan.chunks.empty()) {
      // The copy stream runs its copies in order: the last chunk's free event covers all of them.
      check_cuda(cudaStreamWaitEvent(stream, as_event(free_slot[plan.chunks.back().slot]), 0),
                 "cudaStreamWaitEvent");
    }
    used = true;
  }
};

}  // namespace

// ---- events and pinned memory ----

bool CopyEvent::done() const {
  cudaError_t status = cudaEventQuery(as_event(event_));
  if (status == cudaErrorNotReady) return false;
  check_cuda(status, "cudaEventQuery");
  return true;
}

void CopyEvent::wait() const { check_cuda(cudaEventSynchronize(as_event(event_)), "cudaEventSynchronize"); }

uintptr_t CopyEvent::handle() const { return reinterpret_cast<uintptr_t>(event_.get()); }

MemoryKind cuda_memory_kind(uintptr_t ptr, int* device) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, reinterpret_cast<const void*>(ptr)) != cudaSuccess) {
    cudaGetLastError();
    return MemoryKind::kPageable;
  }
  if (device) *device = attributes.device;
  switch (attributes.type) {
    case cudaMemoryTypeHost: return MemoryKind::kPinnedHost;
    case cudaMemoryTypeDevice: return MemoryKind::kDevice;
    case cudaMemoryTypeManaged: return MemoryKind::kManaged;
    default: return MemoryKind::kPageable;
  }
}

uintptr_t cuda_host_alloc(int64_t nbytes) {
  KVSCHED_EXPECTS(nbytes > 0, std::invalid_argument, "nbytes: must be > 0, got ", nbytes);
  void* ptr = nullptr;
  check_cuda(cudaHostAlloc(&ptr, static_cast<size_t>(nbytes), cudaHostAllocPortable), "cudaHostAlloc");
  return reinterpret_cast<uintptr_t>(ptr);
}

void cuda_host_free(uintptr_t ptr) { check_cuda(cudaFreeHost(reinterpret_cast<void*>(ptr)), "cudaFreeHost"); }

void cuda_host_register(uintptr_t ptr, int64_t nbytes) {
  KVSCHED_EXPECTS(nbytes > 0, std::invalid_argument, "nbytes: must be > 0, got ", nbytes);
  check_cuda(cudaHostRegister(reinterpret_cast<void*>(ptr), static_cast<size_t>(nbytes), cudaHostRegisterPortable),
             "cudaHostRegister");
}

void cuda_host_unregister(uintptr_t ptr) {
  check_cuda(cudaHostUnregister(reinterpret_cast<void*>(ptr)), "cudaHostUnregister");
}

// ---- the engine ----

struct CudaCopyEngine::Impl {
  Lane lanes[2];  // indexed by SwapDirection
};

CudaCopyEngine::CudaCopyEngine(int device, int64_t staging_bytes, const SwapCostModel& cost,
                               bool batch_staging_copies)
    : device_(device), staging_bytes_(staging_bytes), cost_(cost), batch_staging_copies_(batch_staging_copies), impl_(std::make_unique<Impl>()) {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  KVSCHED_EXPECTS(device >= 0 && device < count, std::invalid_argument, "device: ", device, " out of range (",
                  count, " CUDA devices)");
  staging_slot_bytes(staging_bytes);  // throws naming staging_bytes when too small
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  for (Lane& lane : impl_->lanes) lane.init();
}

CudaCopyEngine::~CudaCopyEngine() {
  cudaSetDevice(device_);
  impl_.reset();  // the lanes wait for their last work before freeing
}

bool CudaCopyEngine::batched_supported() {
#if CUDART_VERSION >= 12080
  int driver = 0;
  return cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12080;
#else
  return false;
#endif
}

CopyStrategy CudaCopyEngine::choose(SwapDirection direction, const int64_t* descriptors, size_t count,
                                    bool batched_ok, bool gather_ok) const {
  int64_t bytes = 0;
  for (size_t i = 0; i < count; ++i) bytes += descriptors[4 * i + 3];
  int dir = static_cast<int>(direction);
  auto n = static_cast<int64_t>(count);
  CopyStrategy best = CopyStrategy::kPerDescriptor;
  double best_time = cost_.seconds(dir, best, n, bytes);
  for (CopyStrategy s : {CopyStrategy::kBatched, CopyStrategy::kGatherKernel}) {
    if (s == CopyStrategy::kBatched && (!batched_ok || !batched_supported())) continue;
    if (s == CopyStrategy::kGatherKernel && !gather_ok) continue;
    // The gather strategy pays per host run, not per descriptor (its kernel packs the device side).
    const int64_t copies = s == CopyStrategy::kGatherKernel ? count_host_runs(direction, descriptors, count, staging_bytes_) : n;
    double t = cost_.seconds(dir, s, copies, bytes);
    if (t < best_time) {
      best_time = t;
      best = s;
    }
  }
  return best;
}

CopyEvent CudaCopyEngine::copy(SwapDirection direction, const int64_t* descriptors, size_t count, const BufferSpan* src,
                               const BufferSpan* dst, size_t num_tensors, int strategy, uintptr_t stream_handle) {
  // ---- checks: nothing is enqueued until all pass ----
  KVSCHED_EXPECTS(strategy >= -1 && strategy < kNumCopyStrategies, std::invalid_argument, "strategy: unknown ",
                  strategy);
  check_descriptors(descriptors, count, src, dst, num_tensors);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  const bool out = direction == SwapDirection::kOut;
  for (size_t t = 0; t < num_tensors; ++t) {
    const BufferSpan& device_side = out ? src[t] : dst[t];
    const BufferSpan& host_side = out ? dst[t] : src[t];
    const char* device_name = out ? "src" : "dst";
    const char* host_name = out ? "dst" : "src";
    int device = -1;
    MemoryKind kind = cuda_memory_kind(device_side.ptr, &device);
    KVSCHED_EXPECTS(kind == MemoryKind::kDevice || kind == MemoryKind::kManaged, std::invalid_argument, device_name, "[",
                    t, "]: not CUDA device memory");
    KVSCHED_EXPECTS(device == device_, std::invalid_argument, device_name, "[", t, "]: memory of device ", device,
                    ", this engine copies on device ", device_);
    KVSCHED_EXPECTS(cuda_memory_kind(host_side.ptr, nullptr) == MemoryKind::kPinnedHost, std::invalid_argument,
                    host_name, "[", t, "]: host memory is not pinned (allocate it with kvsched.cuda.pinned_empty or "
                    "register it with kvsched.cuda.pin)");
  }
  bool aligned = aligned16(descriptors, count, src, dst);
  CopyStrategy chosen;
  if (strategy < 0) {
    chosen = choose(direction, descriptors, count, stream_handle != 0, aligned);
  } else {
    chosen = static_cast<CopyStrategy>(strategy);
    KVSCHED_EXPECTS(chosen != CopyStrategy::kGatherKernel || aligned, std::invalid_argument,
                    "strategy: the gather kernel needs 16-byte aligned buffers, offsets and sizes");
    KVSCHED_EXPECTS(chosen != CopyStrategy::kBatched || batched_supported(), std::invalid_argument,
                    "strategy: cudaMemcpyBatchAsync needs a CUDA 12.8+ runtime and driver");
    KVSCHED_EXPECTS(chosen != CopyStrategy::kBatched || stream_handle != 0, std::invalid_argument,
                    "stream: cudaMemcpyBatchAsync cannot run on the legacy default stream (0); pass a created stream");
  }
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const cudaMemcpyKind kind = out ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
  auto address = [](const BufferSpan& span, int64_t offset) { return span.ptr + static_cast<uintptr_t>(offset); };

  // ---- enqueue ----
  if (chosen == CopyStrategy::kPerDescriptor) {
    for (size_t i = 0; i < count; ++i) {
      const int64_t* d = descriptors + 4 * i;
      check_cuda(cudaMemcpyAsync(reinterpret_cast<void*>(address(dst[d[0]], d[2])),
                                 reinterpret_cast<const void*>(address(src[d[0]], d[1])), static_cast<size_t>(d[3]),
                                 kind, stream),
                 "cudaMemcpyAsync");
    }
  } else if (chosen == CopyStrategy::kBatched) {
    CopyBatch batch;
    for (size_t i = 0; i < count; ++i) {
      const int64_t* d = descriptors + 4 * i;
      batch.add(reinterpret_cast<void*>(address(dst[d[0]], d[2])),
                reinterpret_cast<const void*>(address(src[d[0]], d[1])), static_cast<size_t>(d[3]));
    }
    batch.enqueue(stream);
  } else {
    Lane& lane = impl_->lanes[out ? 0 : 1];
    std::lock_guard<std::mutex> hold(lane.mutex);
    lane.reserve(staging_bytes_, 0);
    build_staging_plan(direction, descriptors, count, src, dst, reinterpret_cast<uintptr_t>(lane.staging),
                       staging_bytes_, lane.plan);
    if (!lane.plan.pieces.empty()) {
      lane.reserve(staging_bytes_, lane.plan.pieces.size());
      lane.run(out, stream, batch_staging_copies_ && batched_supported());
    }
  }
  CopyEvent done;
  done.event_ = make_event(cudaEventDisableTiming);
  check_cuda(cudaEventRecord(as_event(done.event_), stream), "cudaEventRecord");
  return done;
}

double CudaCopyEngine::time_copy(SwapDirection direction, const int64_t* descriptors, size_t count,
                                 const BufferSpan* src, const BufferSpan* dst, size_t num_tensors, int strategy,
                                 int repeats) {
  KVSCHED_EXPECTS(repeats > 0, std::invalid_argument, "repeats: must be > 0, got ", repeats);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  cudaStream_t stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  std::shared_ptr<void> owned_stream(stream, [](void* s) { cudaStreamDestroy(static_cast<cudaStream_t>(s)); });
  auto start = make_event(cudaEventDefault);
  auto stop = make_event(cudaEventDefault);
  std::vector<double> seconds;
  // One untimed run first: lazy allocations (staging, tables) stay out of the figures.
  copy(direction, descriptors, count, src, dst, num_tensors, strategy, reinterpret_cast<uintptr_t>(stream)).wait();
  for (int r = 0; r < repeats; ++r) {
    check_cuda(cudaEventRecord(as_event(start), stream), "cudaEventRecord");
    copy(direction, descriptors, count, src, dst, num_tensors, strategy, reinterpret_cast<uintptr_t>(stream));
    check_cuda(cudaEventRecord(as_event(stop), stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(as_event(stop)), "cudaEventSynchronize");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, as_event(start), as_event(stop)), "cudaEventElapsedTime");
    seconds.push_back(ms * 1e-3);
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

}  // namespace kvsched
