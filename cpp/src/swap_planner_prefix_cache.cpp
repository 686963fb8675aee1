// The host tier of the prefix cache: full blocks that left the device prefix cache live on in the
// swap planner's host pool, findable by their chained key, and come back by copy instead of by
// recompute (swap_planner.h: "cached"). The pool is shared with swapped and resident copies; a
// cached block is the first thing evicted when any of them needs room.
//
// Step discipline: the engine runs a step's device-to-host copies (swap-outs, write-backs) before
// its host-to-device ones (swap-ins, loads). A host block that a copy of the current step reads or
// writes is stamped with the step and not evicted until begin_step() starts the next one, so no
// write-back can overwrite a block that a load of the same step still reads.
#include <algorithm>

#include "free_pool.h"
#include "kvsched/errors.h"
#include "kvsched/swap_planner.h"

namespace kvsched {

void SwapPlanner::begin_step() {
  ++step_;
  cached_copied_this_step_ = 0;
  resident_swapped_in_this_step_ = 0;
}

int64_t SwapPlanner::evictable_cached_blocks() const { return cached_blocks_ - cached_copied_this_step_; }

void SwapPlanner::cache_push_back(BlockId block) {
  cache_prev_[block] = cache_tail_;
  cache_next_[block] = -1;
  if (cache_tail_ != -1) cache_next_[cache_tail_] = block; else cache_head_ = block;
  cache_tail_ = block;
}

void SwapPlanner::cache_remove(BlockId block) {
  int32_t prev = cache_prev_[block], next = cache_next_[block];
  if (prev != -1) cache_next_[prev] = next; else cache_head_ = next;
  if (next != -1) cache_prev_[next] = prev; else cache_tail_ = prev;
  cache_prev_[block] = cache_next_[block] = -1;
}

void SwapPlanner::evict_cached(BlockId block) {
  cache_remove(block);
  cached_.erase(cached_key_[block]);
  is_cached_[block] = 0;
  --cached_blocks_;
  ++counters_.evicted_cached_blocks;
  free_pool_->give(&block, 1);
}

BlockId SwapPlanner::take_block_for_cache() {
  if (free_pool_->size() == 0) {
    if (evictable_cached_blocks() + evictable_resident_blocks() == 0) return -1;
    evict_until(1);
  }
  scratch_.clear();
  free_pool_->take(1, scratch_);
  return scratch_[0];
}

SwapPlan SwapPlanner::plan_cache_write(const Hash128* keys, const BlockId* device_blocks, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    KVSCHED_EXPECTS(device_blocks[i] >= 0, std::invalid_argument, "device_blocks[", i, "]: negative block id ",
                    device_blocks[i]);
  }
  ++batch_counter_;  // resident copies are not part of this batch: all evictable
  SwapPlan plan;
  plan.direction = SwapDirection::kOut;
  plan.clear();
  for (size_t i = 0; i < count; ++i) {
    auto found = cached_.find(keys[i]);
    if (found != cached_.end()) {  // the host already holds this content
      BlockId block = found->second;
      cache_remove(block);
      cache_push_back(block);
      ++counters_.cache_write_skips;
      continue;
    }
    BlockId block = take_block_for_cache();
    if (block < 0) {  // the pool is all swapped data or this step's copies: the content is dropped
      ++counters_.cache_write_skips;
      continue;
    }
    cached_key_[block] = keys[i];
    is_cached_[block] = 1;
    cached_.emplace(keys[i], block);
    cache_push_back(block);
    ++cached_blocks_;
    copied_at_step_[block] = step_;
    ++cached_copied_this_step_;
    append_extent(plan, device_blocks[i], block);
  }
  plan.extent_indptr.push_back(static_cast<int64_t>(plan.extents.size() / 3));
  finish_plan(plan, 0);
  counters_.cache_write_blocks += plan.blocks_copied;
  counters_.cache_write_bytes += plan.bytes;
  return plan;
}

size_t SwapPlanner::match_cached(const Hash128* keys, size_t count) const {
  size_t n = 0;
  while (n < count && cached_.count(keys[n]) != 0) ++n;
  return n;
}

SwapPlan SwapPlanner::plan_cache_load(const Hash128* keys, const BlockId* device_blocks, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    KVSCHED_EXPECTS(cached_.count(keys[i]) != 0, std::invalid_argument, "keys[", i, "]: not in the host cache");
    KVSCHED_EXPECTS(device_blocks[i] >= 0, std::invalid_argument, "device_blocks[", i, "]: negative block id ",
                    device_blocks[i]);
  }
  SwapPlan plan;
  plan.direction = SwapDirection::kIn;
  plan.clear();
  for (size_t i = 0; i < count; ++i) {
    BlockId block = cached_.find(keys[i])->second;
    cache_remove(block);
    cache_push_back(block);
    if (!in_this_step(copied_at_step_[block])) {
      copied_at_step_[block] = step_;
      ++cached_copied_this_step_;
    }
    append_extent(plan, block, device_blocks[i]);
  }
  plan.extent_indptr.push_back(static_cast<int64_t>(plan.extents.size() / 3));
  finish_plan(plan, 1);
  counters_.cache_load_blocks += plan.blocks_copied;
  counters_.cache_load_bytes += plan.bytes;
  return plan;
}

double SwapPlanner::estimate_load_seconds(int64_t blocks) const {
  int64_t block_bytes = options_.layout.tensors.empty() ? options_.block_bytes : options_.layout.bytes_per_block();
  int64_t pieces = options_.layout.tensors.empty() ? options_.tensors_per_block
                                                   : static_cast<int64_t>(options_.layout.tensors.size());
  return options_.cost.best_seconds(1, blocks * pieces, blocks * block_bytes);
}

void SwapPlanner::release_as_cached(SeqId seq_id, const Hash128* keys, size_t num_keys) {
  HostCopy* copy = copies_.find(seq_id);
  if (copy == nullptr) return;
  if (!copy->swapped) {
    // Before its blocks change: the resident counts go by them. (Called after the step's copies ran.)
    lru_remove(*copy);
    unmark_swapped_in(*copy);
    const size_t full = std::min({num_keys, copy->blocks.size(),
                                  static_cast<size_t>(copy->valid_tokens / options_.block_size)});
    size_t kept = 0;
    for (size_t b = 0; b < copy->blocks.size(); ++b) {
      const BlockId block = copy->blocks[b];
      if (b < full && cached_.count(keys[b]) == 0) {
        cached_key_[block] = keys[b];
        is_cached_[block] = 1;
        cached_.emplace(keys[b], block);
        cache_push_back(block);
        ++cached_blocks_;
        ++counters_.cache_adopted_blocks;
      } else {
        copy->blocks[kept++] = block;  // not adopted: freed with the copy
      }
    }
    copy->blocks.resize(kept);
  }
  drop_copy(seq_id, *copy);
}

int64_t SwapPlanner::reset_cached() {
  int64_t dropped = cached_blocks_;
  while (cache_head_ != -1) evict_cached(cache_head_);
  counters_.evicted_cached_blocks -= dropped;  // dropped as stale, not evicted for room
  cached_copied_this_step_ = 0;
  return dropped;
}

}  // namespace kvsched
