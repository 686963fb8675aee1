// How the gather/scatter copy strategy cuts a swap plan into kernel work and PCIe copies. Pure CPU
// code, so that CI tests it without a GPU; cuda/cuda_copy_engine.cu executes the result.
//
// Glossary
//   piece    at most `piece_bytes` of one descriptor: what one thread block of the gather (swap-out)
//            or scatter (swap-in) kernel copies between its device address and the staging buffer,
//            so that a few large descriptors still spread over many SMs.
//   slot     the staging buffer is split into two equal slots. Chunk k uses slot k % 2, so the
//            kernel filling (or draining) one slot overlaps the PCIe copies of the other.
//   chunk    consecutive pieces packed into one slot, in descriptor order.
//   run      consecutive pieces of one chunk that lie back to back in ONE host buffer: a single
//            cudaMemcpyAsync between the slot and that buffer. A run never spans two buffers, even
//            when they happen to be adjacent in the address space (the CUDA runtime refuses a copy
//            over two pinned allocations; that was the gather strategy's failure on an H200).
//
// Requirements (checked by the engine before it plans): descriptors passed check_descriptors, and
// for this strategy every address and size is a multiple of 16 bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvsched/copy_descriptors.h"
#include "kvsched/swap_planner.h"

namespace kvsched {

// Laid out as the kernels read it: three 64-bit words.
struct StagingPiece {
  unsigned long long src = 0, dst = 0, nbytes = 0;
};

struct StagingRun {
  int64_t staging_offset = 0;  // from the staging buffer's start (slot offset included)
  uintptr_t host = 0;
  int64_t nbytes = 0;
  int64_t tensor = 0;  // the host buffer it lies in
};

struct StagingChunk {
  size_t piece_begin = 0, piece_end = 0, run_begin = 0, run_end = 0;
  int slot = 0;
};

struct StagingPlan {
  std::vector<StagingPiece> pieces;
  std::vector<StagingRun> runs;
  std::vector<StagingChunk> chunks;
  int64_t slot_bytes = 0;
  int64_t piece_bytes = 0;
};

constexpr int kStagingSlots = 2;
constexpr int64_t kMaxPieceBytes = 64 * 1024;

// Bytes of one slot for a staging buffer (16-byte aligned); a staging buffer must hold two
// slots of at least 16 bytes.
int64_t staging_slot_bytes(int64_t staging_bytes);

// Fills `plan` (its vectors are reused: no allocation once they are large enough). `staging` is
// the staging buffer's device address (pieces carry absolute addresses; any value works on CPU).
// kOut: src = device buffers, dst = host buffers; kIn: the reverse.
void build_staging_plan(SwapDirection direction, const int64_t* descriptors, size_t count, const BufferSpan* src,
                        const BufferSpan* dst, uintptr_t staging, int64_t staging_bytes, StagingPlan& plan);

// Host runs the strategy would copy for these descriptors (runs never span two buffers): the count
// its cost model charges per copy, as per_descriptor_s charges each descriptor for the others.
// Needs no buffers: within one tensor, adjacent host offsets are adjacent addresses.
int64_t count_host_runs(SwapDirection direction, const int64_t* descriptors, size_t count, int64_t staging_bytes);

}  // namespace kvsched
