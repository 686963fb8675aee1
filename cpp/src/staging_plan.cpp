#include "kvsched/staging_plan.h"

#include <algorithm>
#include <stdexcept>

#include "kvsched/errors.h"

namespace kvsched {

int64_t staging_slot_bytes(int64_t staging_bytes) {
  const int64_t slot = (staging_bytes / kStagingSlots) & ~int64_t{15};
  KVSCHED_EXPECTS(slot >= 16, std::invalid_argument, "staging_bytes: must hold ", kStagingSlots,
                  " slots of at least 16 bytes, got ", staging_bytes);
  return slot;
}

void build_staging_plan(SwapDirection direction, const int64_t* descriptors, size_t count, const BufferSpan* src,
                        const BufferSpan* dst, uintptr_t staging, int64_t staging_bytes, StagingPlan& plan) {
  const bool out = direction == SwapDirection::kOut;
  plan.pieces.clear();
  plan.runs.clear();
  plan.chunks.clear();
  plan.slot_bytes = staging_slot_bytes(staging_bytes);
  plan.piece_bytes = std::min(kMaxPieceBytes, plan.slot_bytes);

  StagingChunk chunk;
  int64_t position = 0;  // within the current slot
  auto close_chunk = [&] {
    chunk.piece_end = plan.pieces.size();
    chunk.run_end = plan.runs.size();
    if (chunk.piece_end > chunk.piece_begin) plan.chunks.push_back(chunk);
    const int next_slot = static_cast<int>(plan.chunks.size() % kStagingSlots);
    chunk = StagingChunk{plan.pieces.size(), 0, plan.runs.size(), 0, next_slot};
    position = 0;
  };
  for (size_t i = 0; i < count; ++i) {
    const int64_t* d = descriptors + 4 * i;
    const int64_t tensor = d[0];
    const uintptr_t device_address = out ? src[tensor].ptr + static_cast<uintptr_t>(d[1])
                                         : dst[tensor].ptr + static_cast<uintptr_t>(d[2]);
    const uintptr_t host_address = out ? dst[tensor].ptr + static_cast<uintptr_t>(d[2])
                                       : src[tensor].ptr + static_cast<uintptr_t>(d[1]);
    for (int64_t done = 0; done < d[3]; done += plan.piece_bytes) {
      const int64_t n = std::min(plan.piece_bytes, d[3] - done);
      if (position + n > plan.slot_bytes) close_chunk();
      const int64_t staging_offset = chunk.slot * plan.slot_bytes + position;
      const auto staged = static_cast<unsigned long long>(staging + static_cast<uintptr_t>(staging_offset));
      const auto here = static_cast<unsigned long long>(device_address + static_cast<uintptr_t>(done));
      const auto bytes = static_cast<unsigned long long>(n);
      plan.pieces.push_back(out ? StagingPiece{here, staged, bytes} : StagingPiece{staged, here, bytes});
      const uintptr_t host_here = host_address + static_cast<uintptr_t>(done);
      StagingRun* last = plan.runs.size() > chunk.run_begin ? &plan.runs.back() : nullptr;
      if (last && last->tensor == tensor && last->host + static_cast<uintptr_t>(last->nbytes) == host_here) {
        last->nbytes += n;  // the staging side is contiguous by construction
      } else {
        plan.runs.push_back(StagingRun{staging_offset, host_here, n, tensor});
      }
      position += n;
    }
  }
  close_chunk();
}

int64_t count_host_runs(SwapDirection direction, const int64_t* descriptors, size_t count, int64_t staging_bytes) {
  // The same rule as build_staging_plan, without materializing pieces: a run breaks at a new buffer,
  // a gap on the host side, or a slot boundary.
  const int host_column = direction == SwapDirection::kOut ? 2 : 1;
  const int64_t slot_bytes = staging_slot_bytes(staging_bytes);
  const int64_t piece_bytes = std::min(kMaxPieceBytes, slot_bytes);
  int64_t runs = 0, position = 0, last_tensor = -1, run_end = 0;
  for (size_t i = 0; i < count; ++i) {
    const int64_t* d = descriptors + 4 * i;
    for (int64_t done = 0; done < d[3]; done += piece_bytes) {
      const int64_t n = std::min(piece_bytes, d[3] - done);
      const bool new_slot = position + n > slot_bytes;
      if (new_slot) position = 0;
      if (new_slot || d[0] != last_tensor || d[host_column] + done != run_end) ++runs;
      last_tensor = d[0];
      run_end = d[host_column] + done + n;
      position += n;
    }
  }
  return runs;
}

}  // namespace kvsched
