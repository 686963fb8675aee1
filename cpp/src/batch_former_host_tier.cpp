// The host tier of the prefix cache, as the batch former drives it: which host hits a new
// request loads instead of recomputing, and the write-back of blocks the device prefix cache
// evicted during the step (batch_former.h: "host tier"; the pool itself: swap_planner.h).
#include <algorithm>

#include "kvsched/batch_former.h"

namespace kvsched {

int64_t BatchFormer::host_hit_blocks(const Request& r, int64_t device_hit, int64_t limit) const {
  const int64_t keyed = static_cast<int64_t>(r.keys.size()) - device_hit;
  if (limit <= 0 || keyed <= 0) return 0;
  const int64_t hits = static_cast<int64_t>(
      swap_planner_->match_cached(r.keys.data() + device_hit, static_cast<size_t>(std::min(keyed, limit))));
  if (hits == 0) return 0;
  // A short tail of hits may cost more to copy (per-call and per-descriptor overheads) than to compute.
  const double recompute = static_cast<double>(hits * options_.allocator.block_size) * options_.recompute_seconds_per_token;
  return swap_planner_->estimate_load_seconds(hits) < recompute ? hits : 0;
}

double BatchFormer::load_from_host(const Request& r, int64_t first, int64_t count) {
  // Not scratch_blocks_: start() emits the blocks it allocated from there after this.
  table_scratch_ = allocator_.block_table(r.id);
  SwapPlan load = swap_planner_->plan_cache_load(r.keys.data() + first, table_scratch_.data() + first,
                                                 static_cast<size_t>(count));
  plan_.cache_load_ids.push_back(r.id);
  append_swap(load, plan_.cache_load_ids, plan_.cache_load_indptr, plan_.cache_load, plan_.cache_load_descriptors,
              plan_.cache_load_bytes);
  return load.estimated_seconds;
}

void BatchFormer::retain_in_host_tier(const Request& r) {
  const int64_t bs = options_.allocator.block_size;
  const size_t full = static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(r.keys.size()), r.num_computed / bs));
  swap_planner_->release_as_cached(r.id, r.keys.data(), full);
  if (!options_.host_cache_write_through || full == 0) return;
  table_scratch_ = allocator_.block_table(r.id);
  for (size_t b = 0; b < full; ++b) {
    if (swap_planner_->is_cached(r.keys[b])) continue;
    write_through_keys_.push_back(r.keys[b]);
    write_through_blocks_.push_back(table_scratch_[b]);
  }
}

void BatchFormer::write_through_finished() {
  written_through_.clear();
  write_through_seconds_ = 0.0;
  if (write_through_keys_.empty()) return;
  // Two finished requests that shared a prefix queued its blocks twice: plan_cache_write skips the
  // second (its key is cached by then). The blocks still hold their KV: nothing allocated since.
  SwapPlan write = swap_planner_->plan_cache_write(write_through_keys_.data(), write_through_blocks_.data(),
                                                   write_through_keys_.size());
  for (size_t x = 0; x < write.extents.size(); x += 3) {
    for (int64_t b = 0; b < write.extents[x + 2]; ++b) {
      written_through_.push_back(static_cast<BlockId>(write.extents[x] + b));
    }
  }
  std::sort(written_through_.begin(), written_through_.end());
  write_through_seconds_ = write.estimated_seconds;
  std::vector<int64_t> no_ids, indptr;
  append_swap(write, no_ids, indptr, plan_.cache_write, plan_.cache_write_descriptors, plan_.cache_write_bytes);
  write_through_keys_.clear();
  write_through_blocks_.clear();
}

void BatchFormer::write_back_evictions() {
  allocator_.pop_evictions(evictions_);
  // A write-through may overlap the forward pass unless the step hands its block to another request.
  size_t reused = 0;
  for (const Eviction& e : evictions_) {
    reused += std::binary_search(written_through_.begin(), written_through_.end(), e.block) ? 1 : 0;
  }
  if (!written_through_.empty()) {
    plan_.cache_overlap_seconds +=
        write_through_seconds_ * static_cast<double>(written_through_.size() - reused) /
        static_cast<double>(written_through_.size());
  }
  if (evictions_.empty()) return;
  std::vector<Hash128> keys(evictions_.size());
  std::vector<BlockId> blocks(evictions_.size());
  for (size_t i = 0; i < evictions_.size(); ++i) {
    keys[i] = evictions_[i].key;
    blocks[i] = evictions_[i].block;
  }
  SwapPlan write = swap_planner_->plan_cache_write(keys.data(), blocks.data(), keys.size());
  std::vector<int64_t> no_ids, indptr;  // write-backs belong to no request
  append_swap(write, no_ids, indptr, plan_.cache_write, plan_.cache_write_descriptors, plan_.cache_write_bytes);
}

}  // namespace kvsched
