// The swap planner: where a preempted sequence's KV blocks go in host memory, and which bytes move.
//
// Glossary
//   host pool    blocks of (pinned) host memory numbered 0..num_host_blocks-1, placed with the same
//                contiguity rules as the device pool (FreePool, kContiguous), so that a sequence's
//                host blocks form few runs and its copies are few and large.
//   host copy    per sequence: the host blocks holding its logical blocks [0, n) in token order, and
//                `valid_tokens`, how many leading tokens of them are current.
//   swapped      a sequence whose KV lives on the host only (its device blocks were freed). Its host
//                copy is never evicted.
//   resident     a sequence back on the device whose host copy is kept as a cache: the next
//                swap-out copies only blocks that changed since (multi-turn reuse, FastSwitch).
//                Resident copies are evicted least recently used first when the pool needs room.
//   extent       (src_block, dst_block, n_blocks): n consecutive blocks on both sides.
//   descriptor   (tensor, src_offset, dst_offset, nbytes): one copy inside one tensor of the KV
//                layout; descriptors adjacent on both sides are merged.
//   cached       the host tier of the prefix cache: a host block holding a full device block that
//                left the device prefix cache, findable by the same chained key
//                (swap_planner_prefix_cache.cpp). Evicted least recently used first, before
//                resident copies, whenever the pool needs room; never while a copy of the
//                current step reads or writes it.
//
// Every host block is free, cached, or held by one host copy (swapped or resident).
//
// Why full blocks stay valid: paged attention only appends. A block that was full when it was
// copied holds the same KV until the sequence is dropped, so only the partial last block and blocks
// added since need copying. A sequence whose KV is rewritten must be release()d.
//
// Plans are all or nothing: a call checks every argument and the host room for the whole batch
// before it changes anything. Not thread-safe (the owner serializes; BatchFormer holds its mutex).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <unordered_map>

#include "kvsched/block_allocator.h"
#include "kvsched/block_hash.h"
#include "kvsched/detail/id_map.h"

namespace kvsched {

// One tensor of the engine's KV cache as the planner sees it. vLLM's flash-attention layout is one
// tensor per layer for K and one for V, each [num_blocks, block_size, heads, head_dim] (block bytes
// == stride); a cross-layer layout is a single tensor whose block holds every layer.
struct KvTensorLayout {
  int64_t block_bytes = 0;          // bytes of one block in this tensor (copied as one piece)
  int64_t device_block_stride = 0;  // bytes between consecutive blocks on the device
  int64_t host_block_stride = 0;    // bytes between consecutive blocks on the host
};

struct KvLayout {
  std::vector<KvTensorLayout> tensors;
  int64_t bytes_per_block() const;
};

// How a batch of descriptors is executed (cuda/swap_copy.cu).
enum class CopyStrategy : int { kPerDescriptor = 0, kBatched = 1, kGatherKernel = 2 };
constexpr int kNumCopyStrategies = 3;

// time = per_call_s + n_descriptors * per_descriptor_s + bytes / bandwidth, per direction and
// strategy. Defaults come from published PCIe Gen5 figures (about 2 us of CPU per cudaMemcpyAsync,
// 8-32 KiB copies at 5-15 GB/s, large copies at 50-55 GB/s); calibrate() on a GPU replaces them.
struct CopyCost {
  double per_call_s = 0.0;
  double per_descriptor_s = 0.0;
  double bytes_per_s = 50e9;
};

struct SwapCostModel {
  // [direction][strategy]; direction 0 = device to host (swap-out), 1 = host to device (swap-in).
  CopyCost cost[2][kNumCopyStrategies] = {
      {{0.0, 2.5e-6, 53e9}, {5e-6, 0.1e-6, 50e9}, {10e-6, 0.02e-6, 48e9}},
      {{0.0, 2.5e-6, 53e9}, {5e-6, 0.1e-6, 50e9}, {10e-6, 0.02e-6, 48e9}},
  };
  double seconds(int direction, CopyStrategy strategy, int64_t num_descriptors, int64_t bytes) const;
  // The cheapest strategy for a copy and its time (what the CUDA executor's automatic choice does).
  double best_seconds(int direction, int64_t num_descriptors, int64_t bytes, CopyStrategy* best = nullptr) const;
};

struct SwapPlannerOptions {
  int32_t num_host_blocks = 0;
  int32_t block_size = 16;
  // Empty layout: plans hold extents only; bytes and costs use `block_bytes` (default: a 16-token
  // block of Llama-3-8B in fp16, 32 layers x K,V x 32 KiB) split into `tensors_per_block` pieces.
  KvLayout layout;
  int64_t block_bytes = 2 * 1024 * 1024;
  int32_t tensors_per_block = 64;
  bool reuse_host_copies = true;
  SwapCostModel cost;
};

enum class SwapDirection : int { kOut = 0, kIn = 1 };

struct SwapPlan {
  SwapDirection direction = SwapDirection::kOut;
  std::vector<int64_t> seq_ids;
  std::vector<int64_t> extent_indptr;  // extents of seq i: rows extent_indptr[i]..extent_indptr[i+1]
  std::vector<int64_t> extents;        // flat (src_block, dst_block, n_blocks)
  std::vector<int64_t> descriptors;    // flat (tensor, src_offset, dst_offset, nbytes); needs a layout
  int64_t blocks_copied = 0;
  int64_t blocks_reused = 0;  // blocks not copied: host copy still valid, or prefix-cache hit on swap-in
  int64_t bytes = 0;
  int64_t num_descriptors = 0;  // as executed (counted from the layout, or estimated without one)
  double estimated_seconds = 0.0;
  void clear();
};

struct SwapPlannerStats {
  int32_t num_host_blocks = 0;
  int32_t num_free_host_blocks = 0;     // plain free
  int32_t num_resident_copy_blocks = 0; // held by resident host copies (evictable)
  int32_t num_swapped_blocks = 0;       // held by swapped-out sequences
  int64_t num_swapped = 0;
  int64_t num_resident_copies = 0;
  int64_t swap_outs = 0, swap_ins = 0;
  int64_t blocks_out = 0, blocks_in = 0, blocks_reused = 0;
  int64_t bytes_out = 0, bytes_in = 0;
  int64_t evicted_copies = 0;
  // The host tier of the prefix cache.
  int32_t num_cached_host_blocks = 0;
  int64_t cache_write_blocks = 0, cache_write_bytes = 0;  // written back from the device
  int64_t cache_load_blocks = 0, cache_load_bytes = 0;    // loaded into device blocks (host hits)
  int64_t cache_write_skips = 0;  // write-backs not needed (key already cached) or without room
  int64_t evicted_cached_blocks = 0;
  int64_t cache_adopted_blocks = 0;  // resident copies' blocks kept as cache when their request finished
};

class FreePool;

class SwapPlanner {
 public:
  explicit SwapPlanner(const SwapPlannerOptions& options);
  ~SwapPlanner();
  SwapPlanner(const SwapPlanner&) = delete;
  SwapPlanner& operator=(const SwapPlanner&) = delete;

  const SwapPlannerOptions& options() const { return options_; }

  // Host blocks a swap-out of `seq_id` holding `num_tokens` current tokens would newly take.
  int64_t host_blocks_needed(SeqId seq_id, int64_t num_tokens) const;
  // Whether the pool can take it now (free blocks plus resident copies it may evict).
  bool can_swap_out(SeqId seq_id, int64_t num_tokens) const;
  // Estimated seconds of a swap-out and of the swap-in back, without planning.
  double estimate_round_trip_seconds(SeqId seq_id, int64_t num_tokens) const;

  // Swap-out: sequence i has `num_tokens[i]` current tokens in device blocks
  // `device_blocks[indptr[i]:indptr[i+1]]` (its table in token order, at least ceil(n / block_size)
  // blocks). The caller frees the device blocks once the copy has run.
  SwapPlan plan_swap_out(const SeqId* seq_ids, const int64_t* num_tokens, const int64_t* indptr,
                         const BlockId* device_blocks, size_t count);
  // Swap-in of swapped sequences into freshly allocated device blocks (token order, at least the
  // host copy's block count). The first `skip_blocks[i]` blocks are already on the device (a
  // prefix-cache hit) and are not copied; nullptr skips none. The sequences become resident.
  SwapPlan plan_swap_in(const SeqId* seq_ids, const int64_t* indptr, const BlockId* device_blocks,
                        const int64_t* skip_blocks, size_t count);
  // Drops host copies (finished or aborted sequences, or KV that was rewritten). Unknown ids are ignored.
  void release(const SeqId* seq_ids, size_t count);

  // ---- the host tier of the prefix cache (swap_planner_prefix_cache.cpp) ----
  // Starts a step: blocks read or written by the previous step's copies may be evicted again.
  void begin_step();
  // Write-back of device blocks leaving the device prefix cache (keys[i] is device_blocks[i]'s):
  // each key not cached yet gets a host block (free, else by evicting) and a device-to-host
  // extent; a key already cached is refreshed, and one that finds no room is skipped.
  SwapPlan plan_cache_write(const Hash128* keys, const BlockId* device_blocks, size_t count);
  // How many leading `keys` the host tier holds.
  size_t match_cached(const Hash128* keys, size_t count) const;
  // Loads cached blocks `keys` (all cached, as match_cached() says) into fresh device blocks.
  SwapPlan plan_cache_load(const Hash128* keys, const BlockId* device_blocks, size_t count);
  // Estimated seconds of loading `blocks` blocks (each its own run: the worst case).
  double estimate_load_seconds(int64_t blocks) const;
  // Forgets every cached block (the KV is stale); returns how many were dropped.
  int64_t reset_cached();
  bool is_cached(const Hash128& key) const { return cached_.count(key) != 0; }
  // Releases a finished sequence's host copy, keeping its first `num_keys` blocks (those whose
  // tokens are all current) as cached blocks under `keys`: no copy needed. A swapped copy is dropped.
  void release_as_cached(SeqId seq_id, const Hash128* keys, size_t num_keys);

  bool is_swapped(SeqId seq_id) const;
  bool has_host_copy(SeqId seq_id) const;
  int64_t num_swapped_tokens(SeqId seq_id) const;  // current tokens of a swapped sequence
  std::vector<BlockId> host_blocks(SeqId seq_id) const;
  SwapPlannerStats stats() const;
  // Throws std::logic_error describing the first broken invariant.
  void check_invariants() const;

 private:
  struct HostCopy {
    std::vector<BlockId> blocks;
    int64_t valid_tokens = 0;
    bool swapped = false;
    int64_t lru_prev = -1, lru_next = -1;  // seq ids in the resident LRU list
    bool in_lru = false;
    uint64_t batch_stamp = 0;
    uint64_t swapped_in_at_step = 0;  // its swap-in reads these blocks: not evicted in that step
  };

  int64_t num_blocks_for(int64_t tokens) const;
  int64_t reusable_blocks(const HostCopy* copy, int64_t num_tokens) const;
  void evict_until(int64_t free_needed);
  void drop_copy(SeqId seq_id, HostCopy& copy);
  void unmark_swapped_in(HostCopy& copy);  // before its blocks change or it stops being resident
  void lru_push_back(SeqId seq_id, HostCopy& copy);
  void lru_remove(HostCopy& copy);
  // Checks sequence i's slice of a CSR block table: indptr does not decrease, it holds at least
  // `blocks` blocks, and those ids are >= 0.
  static void check_table(size_t i, SeqId id, const int64_t* indptr, const BlockId* device_blocks, int64_t blocks);
  void append_extent(SwapPlan& plan, BlockId src, BlockId dst);
  // Bytes, descriptors and estimated time of a planned copy.
  void finish_plan(SwapPlan& plan, int direction);
  // Adds a planned swap of `num_sequences` sequences to the swap counters.
  void count_swap(const SwapPlan& plan, int direction, size_t num_sequences);
  // Resident blocks that eviction may take now (not read by a swap-in of this step).
  int64_t evictable_resident_blocks() const { return resident_blocks_ - resident_swapped_in_this_step_; }
  // Host tier: evictable cached blocks (not touched by this step's copies), and taking one free
  // host block for a write-back (evicting a cached block, then a resident copy); -1 when none.
  int64_t evictable_cached_blocks() const;
  void evict_cached(BlockId block);
  BlockId take_block_for_cache();
  void cache_push_back(BlockId block);
  void cache_remove(BlockId block);

  SwapPlannerOptions options_;
  std::unique_ptr<FreePool> free_pool_;
  detail::IdMap<HostCopy> copies_;
  int64_t lru_head_ = -1, lru_tail_ = -1;
  int32_t resident_blocks_ = 0, swapped_blocks_ = 0;
  int64_t num_swapped_ = 0;
  uint64_t batch_counter_ = 0;
  std::vector<BlockId> scratch_targets_;  // plan_swap_in: device blocks written, to find repeats
  SwapPlannerStats counters_;
  std::vector<BlockId> scratch_;
  // Host tier: key -> host block, and per host block its key, LRU links (head = least recently
  // used) and the step that last copied it.
  std::unordered_map<Hash128, BlockId, Hash128Hasher> cached_;
  std::vector<Hash128> cached_key_;
  std::vector<uint8_t> is_cached_;
  std::vector<int32_t> cache_prev_, cache_next_;
  std::vector<uint64_t> copied_at_step_;
  int32_t cache_head_ = -1, cache_tail_ = -1;
  int32_t cached_blocks_ = 0, cached_copied_this_step_ = 0;
  int32_t resident_swapped_in_this_step_ = 0;  // blocks of copies swapped in this step
  uint64_t step_ = 0;  // 0 until begin_step(): a planner used on its own protects nothing by step
  bool in_this_step(uint64_t stamp) const { return stamp != 0 && stamp == step_; }
};

}  // namespace kvsched
