// Paged KV-cache block allocator with contiguity-aware placement, copy-on-write sharing, prefix
// caching and TTL pins.
//
// Glossary
//   block      a fixed slot of `block_size` tokens in the KV pool, identified by an int32 id.
//   sequence   an int64 id with a block table (its blocks in token order) and a token count.
//   pin        a released sequence whose blocks are kept for `ttl` steps because its next turn is
//              expected (Continuum). A pinned id is reserved until restore(), unpin() or expiry.
//   key        a 128-bit content key of a full block, chained over the whole prefix (block_hash.h).
//   seq_ref    per block: how many live block tables hold it.   pin_ref: how many pins hold it.
//   cache event  a change to the set of cached keys, logged in order with `track_cache_events`:
//              stored (a sequence's full block got its key: the block is findable from now on),
//              removed (a cached block's key was dropped because an allocation reused the block),
//              cleared (reset_prefix_cache dropped every key). An engine that publishes its prefix
//              cache (vLLM's KV events) replays them; a block whose content is already cached
//              elsewhere stays unkeyed and logs nothing.
//
// Every block is in exactly one state:
//   free    seq_ref == 0, pin_ref == 0, no key     -> in the FreePool (reused first)
//   cached  seq_ref == 0, pin_ref == 0, has a key  -> in the LRU list, findable by key until evicted
//   pinned  seq_ref == 0, pin_ref > 0
//   used    seq_ref > 0
// "Available" blocks (what an allocation may take) are free + cached.
//
// Placement: growing a sequence takes the block right after its last one when free, then the
// largest free run (leaving room on both sides to grow), then anything; cached blocks are evicted
// (least recently released first) only when no plain free block is left.
//
// Errors: every call checks all of its input before changing anything; a failing call leaves the
// allocator as it was (batched calls are all-or-nothing). See errors.h for the types.
// Thread safety: every public method takes an internal mutex, so concurrent calls are serialized.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <queue>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvsched/block_hash.h"
#include "kvsched/detail/id_map.h"

namespace kvsched {

using SeqId = int64_t;
using BlockId = int32_t;

enum class Placement : int { kContiguous = 0, kLifo = 1, kFifo = 2 };

struct BlockAllocatorOptions {
  int32_t num_blocks = 0;
  int32_t block_size = 16;
  bool enable_prefix_caching = true;
  Placement placement = Placement::kContiguous;
  HashAlgorithm hash_algorithm = HashAlgorithm::kFast128;
  // Record every cached block evicted for reuse, with its key, for pop_evictions() (a host tier
  // writes them back). Off, nothing is recorded.
  bool track_evictions = false;
  // Log every cache event for pop_cache_events() (see the glossary). Off, nothing is recorded.
  bool track_cache_events = false;
};

struct BlockAllocatorStats {
  int32_t num_blocks = 0;
  int32_t num_free = 0;
  int32_t num_cached = 0;
  int32_t num_pinned = 0;
  int32_t num_used = 0;
  int64_t num_sequences = 0;
  int64_t num_pinned_sequences = 0;
  int64_t prefix_queries = 0;       // new sequences allocated with keys
  int64_t prefix_query_blocks = 0;  // blocks those lookups could have hit
  int64_t prefix_hit_blocks = 0;    // blocks they did hit
  int64_t cache_evictions = 0;      // cached blocks whose key was dropped for reuse
  int64_t copy_on_writes = 0;
  int64_t table_blocks = 0;   // blocks in live block tables (shared blocks counted per table)
  int64_t table_extents = 0;  // maximal runs of consecutive ids in live block tables
};

struct CopyOnWrite {
  SeqId seq_id;
  BlockId src;
  BlockId dst;
};

// A cached block whose key was dropped because an allocation reused it; its KV is intact until
// the new owner writes it.
struct Eviction {
  BlockId block;
  Hash128 key;
};

enum class CacheEventKind : int32_t { kStored = 0, kRemoved = 1, kCleared = 2 };

struct CacheEvent {
  CacheEventKind kind;
  SeqId seq_id;         // kStored: the sequence whose block got the key; -1 otherwise
  int64_t block_index;  // kStored: that block's index in the sequence's table; -1 otherwise
  Hash128 key;          // kStored, kRemoved: the block's key; zero for kCleared
};

class FreePool;

class BlockAllocator {
 public:
  explicit BlockAllocator(const BlockAllocatorOptions& options);
  ~BlockAllocator();
  BlockAllocator(const BlockAllocator&) = delete;
  BlockAllocator& operator=(const BlockAllocator&) = delete;

  const BlockAllocatorOptions& options() const { return options_; }
  int32_t num_free_blocks() const;  // free + cached (evictable)
  bool contains(SeqId seq_id) const;
  bool is_pinned(SeqId seq_id) const;
  int64_t num_tokens(SeqId seq_id) const;
  int64_t num_cached_tokens(SeqId seq_id) const;  // prefix-cache hit when the sequence was created
  std::vector<BlockId> block_table(SeqId seq_id) const;

  // Blocks an allocate(seq_id, num_tokens) would take now (copy-on-write included).
  int64_t blocks_needed(SeqId seq_id, int64_t num_tokens) const;
  bool can_allocate(SeqId seq_id, int64_t num_tokens) const;

  // Grows `seq_id` (created if new) to hold `num_tokens` tokens and appends the blocks it added to
  // `added`. Asking for no more tokens than held is a no-op. With `keys` (the chained keys of the
  // sequence's full blocks, possibly more than it holds yet): a new sequence first shares the
  // longest cached prefix (always leaving at least one token to compute), and full blocks not yet
  // registered are registered. Keys are ignored when prefix caching is off. A copy-on-write of a
  // shared partial last block is queued for pop_copy_on_writes().
  void allocate(SeqId seq_id, int64_t num_tokens, const Hash128* keys, size_t num_keys, std::vector<BlockId>& added);

  // allocate() for many sequences, all or nothing. indptr[i]..indptr[i+1] index `added` for seq i.
  void allocate_batch(const SeqId* seq_ids, const int64_t* num_tokens, size_t count, std::vector<int64_t>& indptr,
                      std::vector<BlockId>& added);

  // Releases a sequence; with ttl_steps > 0 its blocks stay pinned until advance_steps() passes
  // the ttl, restore() or unpin().
  void free(SeqId seq_id, int64_t ttl_steps = 0);
  void free_batch(const SeqId* seq_ids, size_t count, int64_t ttl_steps = 0);

  // `child` (new) shares every block of `parent` by reference.
  void fork(SeqId parent, SeqId child);

  // Longest run of leading keys whose blocks are cached, used or pinned; appends their ids to `hits`.
  void match_prefix(const Hash128* keys, size_t num_keys, std::vector<BlockId>& hits) const;
  // Keys of the full blocks of `tokens`, with this allocator's hash function.
  void hash_tokens(const int32_t* tokens, size_t num_tokens, uint64_t salt, std::vector<Hash128>& keys) const;
  // Drops every cached key (blocks become plain free); returns how many were dropped.
  int64_t reset_prefix_cache();

  // Advances the step clock; expired pins are released. Returns how many pins expired.
  int64_t advance_steps(int64_t steps);
  void unpin(SeqId seq_id);
  void restore(SeqId seq_id);

  std::vector<CopyOnWrite> pop_copy_on_writes();
  // The evictions since the last call, oldest first (needs options.track_evictions).
  void pop_evictions(std::vector<Eviction>& out);
  // The cache events since the last call, oldest first (needs options.track_cache_events; the
  // log grows until popped).
  void pop_cache_events(std::vector<CacheEvent>& out);
  // Appends the key of every block findable in the prefix cache now (cached, used or pinned).
  void cached_keys(std::vector<Hash128>& out) const;
  BlockAllocatorStats stats() const;
  // Throws std::logic_error describing the first broken invariant.
  void check_invariants() const;

 private:
  struct Sequence {
    std::vector<BlockId> blocks;
    int64_t num_tokens = 0;
    int64_t num_cached_tokens = 0;
    int64_t num_keyed_blocks = 0;  // leading full blocks whose keys were given
    Hash128 last_key;              // key of block num_keyed_blocks - 1
    int32_t num_extents = 0;
    uint64_t batch_stamp = 0;  // detects duplicate ids inside one batched call
  };
  struct Pin {
    Sequence sequence;
    int64_t expires_at = 0;
  };

  // Checks shared by the single and batched paths; all throw without changing state.
  void check_seq_id(SeqId seq_id, const char* name) const;
  void check_num_tokens(int64_t num_tokens, const char* name) const;
  int64_t growth_blocks(const Sequence* seq, int64_t num_tokens) const;
  bool needs_copy_on_write(const Sequence* seq, int64_t num_tokens) const;
  void throw_out_of_blocks(SeqId seq_id, int64_t needed) const;

  // Mutations; callers have checked that they succeed.
  void grow(SeqId seq_id, Sequence& seq, int64_t num_tokens, std::vector<BlockId>& added);
  void take_blocks(BlockId after, int64_t count, std::vector<BlockId>& out);
  void append_blocks(Sequence& seq, const BlockId* blocks, size_t count);
  void add_seq_ref(BlockId block);
  // Drop one reference; true when the block is left unreferenced and must be released.
  bool drop_seq_ref(BlockId block);
  bool drop_pin_ref(BlockId block);
  void release_block(BlockId block);
  void release_blocks(const std::vector<BlockId>& blocks, bool pinned);
  void register_keys(SeqId seq_id, Sequence& seq, const Hash128* keys, size_t num_keys);
  void free_locked(SeqId seq_id, int64_t ttl_steps);
  static void reset_sequence(Sequence& seq);
  size_t match_prefix_locked(const Hash128* keys, size_t num_keys, size_t max_blocks) const;
  void lru_push(BlockId block);
  void lru_remove(BlockId block);
  BlockId lru_pop();
  static int32_t extent_starts(const std::vector<BlockId>& blocks, size_t index);

  BlockAllocatorOptions options_;
  mutable std::mutex mutex_;
  std::unique_ptr<FreePool> free_pool_;
  detail::IdMap<Sequence> sequences_;
  std::unordered_map<SeqId, Pin> pins_;
  std::priority_queue<std::pair<int64_t, SeqId>, std::vector<std::pair<int64_t, SeqId>>, std::greater<>> pin_expiry_;
  int64_t clock_ = 0;
  uint64_t batch_counter_ = 0;

  std::vector<int32_t> seq_ref_;
  std::vector<int32_t> pin_ref_;
  std::vector<uint8_t> has_key_;
  std::vector<Hash128> key_;
  std::unordered_map<Hash128, BlockId, Hash128Hasher> cached_blocks_;  // key -> block, any state

  // LRU of cached blocks: intrusive doubly-linked list, head = least recently released.
  std::vector<int32_t> lru_prev_;
  std::vector<int32_t> lru_next_;
  std::vector<uint8_t> in_lru_;
  int32_t lru_head_ = -1;
  int32_t lru_tail_ = -1;
  int32_t lru_size_ = 0;

  int32_t num_pinned_only_ = 0;
  std::vector<CopyOnWrite> pending_copies_;
  std::vector<Eviction> evictions_;
  std::vector<CacheEvent> cache_events_;
  std::vector<BlockId> scratch_;
  std::vector<Sequence*> batch_targets_;  // reused across batched calls to avoid reallocation
  std::vector<SeqId> batch_inserted_;
  BlockAllocatorStats counters_;  // the cumulative counters and table totals; states are derived
};

}  // namespace kvsched
