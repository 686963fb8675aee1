// CUDA executor for swap plans (see kvsched/cuda_copy_engine.h for the strategies).
//
// Glossary
//   piece    at most kPieceBytes of one descriptor: the unit one thread block of the gather/scatter
//            kernel copies, so that a few large descriptors still spread over many SMs.
//   staging  a device buffer the gather kernel packs pieces into, in descriptor order; a swap is
//            cut into chunks that each fit it.
//   run      consecutive pieces of a chunk that are also contiguous on the host side: one
//            cudaMemcpyAsync between staging and host moves a whole run.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "kvsched/cuda_copy_engine.h"
#include "kvsched/errors.h"

namespace kvsched {
namespace {

constexpr int64_t kPieceBytes = 64 * 1024;
constexpr int kCopyThreads = 256;

void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear a sticky launch error so later calls start clean
    throw std::runtime_error(detail::concat(what, ": ", cudaGetErrorName(error), ": ", cudaGetErrorString(error)));
  }
}

struct Piece {
  unsigned long long src, dst, nbytes;
};
struct Run {
  int64_t staging_offset;
  uintptr_t host;
  int64_t nbytes;
};
struct Chunk {
  size_t piece_begin, piece_end, run_begin, run_end;
};

// One thread block per piece; 16-byte loads and stores (pieces are 16-byte aligned).
__global__ void copy_pieces(const Piece* pieces) {
  const Piece piece = pieces[blockIdx.x];
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
  void* staging = nullptr;
  Piece* host_pieces = nullptr;    // pinned, uploaded each gather call
  Piece* device_pieces = nullptr;
  size_t piece_capacity = 0;
  std::shared_ptr<void> pieces_uploaded;  // host_pieces may be rewritten once this has fired
  std::shared_ptr<void> last_use;         // staging and device_pieces are free once this has fired
  bool used = false;
  std::vector<Piece> pieces;
  std::vector<Run> runs;
  std::vector<Chunk> chunks;

  ~Impl() {
    if (used) cudaEventSynchronize(as_event(last_use));
    cudaFree(staging);
    cudaFree(device_pieces);
    cudaFreeHost(host_pieces);
  }

  void reserve_pieces(size_t count) {
    if (count <= piece_capacity) return;
    if (used) {
      check_cuda(cudaEventSynchronize(as_event(last_use)), "cudaEventSynchronize");
    }
    size_t capacity = std::max<size_t>(count, 2 * piece_capacity);
    check_cuda(cudaFree(device_pieces), "cudaFree");
    check_cuda(cudaFreeHost(host_pieces), "cudaFreeHost");
    device_pieces = nullptr;
    host_pieces = nullptr;
    piece_capacity = 0;
    check_cuda(cudaMalloc(&device_pieces, capacity * sizeof(Piece)), "cudaMalloc (piece table)");
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&host_pieces), capacity * sizeof(Piece), cudaHostAllocDefault),
               "cudaHostAlloc (piece table)");
    piece_capacity = capacity;
  }
};

CudaCopyEngine::CudaCopyEngine(int device, int64_t staging_bytes, const SwapCostModel& cost)
    : device_(device), staging_bytes_(staging_bytes), cost_(cost), impl_(std::make_unique<Impl>()) {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  KVSCHED_EXPECTS(device >= 0 && device < count, std::invalid_argument, "device: ", device, " out of range (",
                  count, " CUDA devices)");
  KVSCHED_EXPECTS(staging_bytes >= kPieceBytes, std::invalid_argument, "staging_bytes: must be >= ", kPieceBytes,
                  ", got ", staging_bytes);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  impl_->pieces_uploaded = make_event(cudaEventDisableTiming);
  impl_->last_use = make_event(cudaEventDisableTiming);
}

CudaCopyEngine::~CudaCopyEngine() {
  cudaSetDevice(device_);
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
    double t = cost_.seconds(dir, s, n, bytes);
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
#if CUDART_VERSION >= 12080
    std::vector<void*> dsts(count);
    std::vector<const void*> srcs(count);
    std::vector<size_t> sizes(count);
    for (size_t i = 0; i < count; ++i) {
      const int64_t* d = descriptors + 4 * i;
      dsts[i] = reinterpret_cast<void*>(address(dst[d[0]], d[2]));
      srcs[i] = reinterpret_cast<const void*>(address(src[d[0]], d[1]));
      sizes[i] = static_cast<size_t>(d[3]);
    }
    cudaMemcpyAttributes attributes{};
    attributes.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attribute_index = 0;
    if (count > 0) {
#if CUDART_VERSION >= 13000
      check_cuda(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), count, &attributes, &attribute_index, 1,
                                      stream),
                 "cudaMemcpyBatchAsync");
#else
      size_t fail_index = 0;
      check_cuda(cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), count, &attributes,
                                      &attribute_index, 1, &fail_index, stream),
                 "cudaMemcpyBatchAsync");
#endif
    }
#endif
  } else {
    // Gather (swap-out) or scatter (swap-in) through the staging buffer.
    Impl& impl = *impl_;
    if (impl.staging == nullptr) {
      check_cuda(cudaMalloc(&impl.staging, static_cast<size_t>(staging_bytes_)), "cudaMalloc (staging)");
    }
    impl.pieces.clear();
    impl.runs.clear();
    impl.chunks.clear();
    const auto staging = reinterpret_cast<uintptr_t>(impl.staging);
    int64_t position = 0;
    Chunk chunk{0, 0, 0, 0};
    for (size_t i = 0; i < count; ++i) {
      const int64_t* d = descriptors + 4 * i;
      uintptr_t device_address = out ? address(src[d[0]], d[1]) : address(dst[d[0]], d[2]);
      uintptr_t host_address = out ? address(dst[d[0]], d[2]) : address(src[d[0]], d[1]);
      for (int64_t done = 0; done < d[3]; done += kPieceBytes) {
        int64_t n = std::min(kPieceBytes, d[3] - done);
        if (position + n > staging_bytes_) {  // close the chunk: staging is full
          chunk.piece_end = impl.pieces.size();
          chunk.run_end = impl.runs.size();
          impl.chunks.push_back(chunk);
          chunk = Chunk{impl.pieces.size(), 0, impl.runs.size(), 0};
          position = 0;
        }
        uintptr_t staged = staging + static_cast<uintptr_t>(position);
        uintptr_t here = device_address + static_cast<uintptr_t>(done);
        impl.pieces.push_back(out ? Piece{here, staged, static_cast<unsigned long long>(n)}
                                  : Piece{staged, here, static_cast<unsigned long long>(n)});
        uintptr_t host_here = host_address + static_cast<uintptr_t>(done);
        if (impl.runs.size() > chunk.run_begin && impl.runs.back().host + static_cast<uintptr_t>(impl.runs.back().nbytes) == host_here) {
          impl.runs.back().nbytes += n;
        } else {
          impl.runs.push_back(Run{position, host_here, n});
        }
        position += n;
      }
    }
    chunk.piece_end = impl.pieces.size();
    chunk.run_end = impl.runs.size();
    if (chunk.piece_end > chunk.piece_begin) impl.chunks.push_back(chunk);

    if (!impl.pieces.empty()) {
      impl.reserve_pieces(impl.pieces.size());
      // The pinned table and the device table / staging of the previous call must be released.
      if (impl.used) {
        check_cuda(cudaEventSynchronize(as_event(impl.pieces_uploaded)), "cudaEventSynchronize");
        check_cuda(cudaStreamWaitEvent(stream, as_event(impl.last_use), 0), "cudaStreamWaitEvent");
      }
      std::copy(impl.pieces.begin(), impl.pieces.end(), impl.host_pieces);
      check_cuda(cudaMemcpyAsync(impl.device_pieces, impl.host_pieces, impl.pieces.size() * sizeof(Piece),
                                 cudaMemcpyHostToDevice, stream),
                 "cudaMemcpyAsync (piece table)");
      check_cuda(cudaEventRecord(as_event(impl.pieces_uploaded), stream), "cudaEventRecord");
      for (const Chunk& c : impl.chunks) {
        auto copy_runs = [&] {
          for (size_t r = c.run_begin; r < c.run_end; ++r) {
            const Run& run = impl.runs[r];
            void* staged = reinterpret_cast<void*>(staging + static_cast<uintptr_t>(run.staging_offset));
            void* host = reinterpret_cast<void*>(run.host);
            check_cuda(cudaMemcpyAsync(out ? host : staged, out ? staged : host, static_cast<size_t>(run.nbytes), kind,
                                       stream),
                       "cudaMemcpyAsync (staging)");
          }
        };
        if (!out) copy_runs();
        copy_pieces<<<static_cast<unsigned>(c.piece_end - c.piece_begin), kCopyThreads, 0, stream>>>(
            impl.device_pieces + c.piece_begin);
        check_cuda(cudaGetLastError(), out ? "gather kernel launch" : "scatter kernel launch");
        if (out) copy_runs();
      }
      check_cuda(cudaEventRecord(as_event(impl.last_use), stream), "cudaEventRecord");
      impl.used = true;
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
