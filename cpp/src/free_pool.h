// The set of plain free blocks (no live reference, no cached content) and where to place new blocks.
//
// Glossary
//   run      a maximal range [start, start + length) of consecutive free blocks. Two runs are never
//            adjacent: freeing merges a returned range with the runs on either side.
//   boundary run_length_[start] holds the length at a run's first block, run_start_[end] the start at
//   tags     its last block, so both neighbours of a freed range are found in O(1) (as in dlmalloc).
//   bins     runs are kept in 32 intrusive lists by floor(log2(length)); a bit mask of non-empty bins
//            finds the largest size class in O(1) (as in TLSF).
//
// Placement modes: kContiguous uses runs; kLifo and kFifo are plain free lists (the baselines that
// vLLM-style pools use), kept so that contiguity can be compared inside one implementation.
// Not thread-safe; the owning BlockAllocator serializes access.
#pragma once

#include <cstdint>
#include <vector>

#include "kvsched/block_allocator.h"

namespace kvsched {

class FreePool {
 public:
  FreePool(int32_t num_blocks, Placement placement);

  int32_t size() const { return num_free_; }
  bool is_free(BlockId block) const { return free_flag_[block] != 0; }

  // Takes up to `max_count` blocks that directly follow `last` (contiguous mode only), appending them
  // to `out`. Returns how many were taken (0 when the block after `last` is not free).
  int32_t take_following(BlockId last, int32_t max_count, std::vector<BlockId>& out);

  // Takes exactly `count` blocks (count <= size()), as few runs as possible, appending them to `out`.
  void take(int32_t count, std::vector<BlockId>& out);

  // Returns blocks to the pool; ascending neighbours in `blocks` are merged into one run.
  void give(const BlockId* blocks, size_t count);

  // Throws std::logic_error when the pool's structure is inconsistent.
  void check_invariants() const;

 private:
  static int bin_of(int32_t length);
  void link_run(BlockId start, int32_t length);
  void unlink_run(BlockId start);
  void mark(BlockId start, int32_t length, uint8_t flag);
  void give_run(BlockId start, int32_t length);
  BlockId largest_run() const;
  void take_from_run(BlockId run, int32_t offset, int32_t count, std::vector<BlockId>& out);

  int32_t num_blocks_;
  Placement placement_;
  int32_t num_free_ = 0;
  std::vector<uint8_t> free_flag_;

  // kContiguous
  std::vector<int32_t> run_length_;
  std::vector<int32_t> run_start_;
  std::vector<int32_t> bin_next_;
  std::vector<int32_t> bin_prev_;
  int32_t bin_head_[32];
  uint32_t nonempty_bins_ = 0;

  // kLifo / kFifo: a ring buffer of block ids.
  std::vector<BlockId> ring_;
  size_t ring_head_ = 0;
};

}  // namespace kvsched
