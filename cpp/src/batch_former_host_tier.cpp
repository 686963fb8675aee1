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

void BatchFormer::load_from_host(const Request& r, int64_t first, int64_t count) {
  scratch_blocks_ = allocator_.block_table(r.id);
  SwapPlan load = swap_planner_->plan_cache_load(r.keys.data() + first, scratch_blocks_.data() + first,
                                                 static_cast<size_t>(count));
  plan_.cache_load_ids.push_back(r.id);
  append_swap(load, plan_.cache_load_ids, plan_.cache_load_indptr, plan_.cache_load, plan_.cache_load_descriptors,
              plan_.cache_load_bytes);
}

void BatchFormer::write_back_evictions() {
  allocator_.pop_evictions(evictions_);
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
