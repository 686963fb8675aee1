#include "kvsched/block_allocator.h"

#include <algorithm>

#include "free_pool.h"
#include "kvsched/errors.h"

namespace kvsched {
namespace {
constexpr int32_t kNone = -1;
constexpr int32_t kMaxBlockSize = 1 << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

BlockAllocator::BlockAllocator(const BlockAllocatorOptions& options) : options_(options) {
  KVSCHED_EXPECTS(options.num_blocks > 0, std::invalid_argument, "num_blocks must be > 0, got ", options.num_blocks);
  KVSCHED_EXPECTS(options.block_size > 0 && options.block_size <= kMaxBlockSize, std::invalid_argument,
                  "block_size must be in [1, ", kMaxBlockSize, "], got ", options.block_size);
  int placement = static_cast<int>(options.placement);
  KVSCHED_EXPECTS(placement >= 0 && placement <= 2, std::invalid_argument, "placement must be 0, 1 or 2, got ", placement);
  int algorithm = static_cast<int>(options.hash_algorithm);
  KVSCHED_EXPECTS(algorithm == 0 || algorithm == 1, std::invalid_argument, "hash_algorithm must be 0 or 1, got ", algorithm);
  size_t n = static_cast<size_t>(options.num_blocks);
  free_pool_ = std::make_unique<FreePool>(options.num_blocks, options.placement);
  seq_ref_.assign(n, 0);
  pin_ref_.assign(n, 0);
  has_key_.assign(n, 0);
  key_.assign(n, Hash128{});
  lru_prev_.assign(n, kNone);
  lru_next_.assign(n, kNone);
  in_lru_.assign(n, 0);
}

BlockAllocator::~BlockAllocator() = default;

// ---------------------------------------------------------------- queries

int32_t BlockAllocator::num_free_blocks() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return free_pool_->size() + lru_size_;
}

bool BlockAllocator::contains(SeqId seq_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return sequences_.find(seq_id) != nullptr;
}

bool BlockAllocator::is_pinned(SeqId seq_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pins_.count(seq_id) != 0;
}

#define KVSCHED_FIND_SEQUENCE(seq, seq_id, name)                                                     \
  auto* seq = sequences_.find(seq_id);                                                               \
  KVSCHED_EXPECTS(seq != nullptr, UnknownId, name, " ", seq_id,                                      \
                  pins_.count(seq_id) ? " is pinned, not live" : " is not a live sequence")

int64_t BlockAllocator::num_tokens(SeqId seq_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_FIND_SEQUENCE(seq, seq_id, "seq_id");
  return seq->num_tokens;
}

int64_t BlockAllocator::num_cached_tokens(SeqId seq_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_FIND_SEQUENCE(seq, seq_id, "seq_id");
  return seq->num_cached_tokens;
}

std::vector<BlockId> BlockAllocator::block_table(SeqId seq_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_FIND_SEQUENCE(seq, seq_id, "seq_id");
  return seq->blocks;
}

void BlockAllocator::check_seq_id(SeqId seq_id, const char* name) const {
  KVSCHED_EXPECTS(seq_id >= 0, std::invalid_argument, name, " must be >= 0, got ", seq_id);
  KVSCHED_EXPECTS(pins_.count(seq_id) == 0, std::invalid_argument, name, " ", seq_id,
                  " is pinned; restore() or unpin() it first");
}

void BlockAllocator::check_num_tokens(int64_t num_tokens, const char* name) const {
  int64_t capacity = static_cast<int64_t>(options_.num_blocks) * options_.block_size;
  KVSCHED_EXPECTS(num_tokens >= 0, std::invalid_argument, name, " must be >= 0, got ", num_tokens);
  KVSCHED_EXPECTS(num_tokens <= capacity, std::invalid_argument, name, " ", num_tokens,
                  " exceeds the pool's capacity of ", capacity, " tokens");
}

int64_t BlockAllocator::growth_blocks(const Sequence* seq, int64_t num_tokens) const {
  int64_t have = seq ? static_cast<int64_t>(seq->blocks.size()) : 0;
  return std::max<int64_t>(0, ceil_div(num_tokens, options_.block_size) - have);
}

bool BlockAllocator::needs_copy_on_write(const Sequence* seq, int64_t num_tokens) const {
  if (!seq || num_tokens <= seq->num_tokens || seq->num_tokens % options_.block_size == 0) return false;
  BlockId last = seq->blocks.back();
  return seq_ref_[last] + pin_ref_[last] > 1;
}

void BlockAllocator::throw_out_of_blocks(SeqId seq_id, int64_t needed) const {
  throw OutOfBlocks(detail::concat("seq_id ", seq_id, " needs ", needed, " blocks but only ",
                                   free_pool_->size() + lru_size_, " are available (", free_pool_->size(), " free, ",
                                   lru_size_, " cached)"));
}

int64_t BlockAllocator::blocks_needed(SeqId seq_id, int64_t num_tokens) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_seq_id(seq_id, "seq_id");
  check_num_tokens(num_tokens, "num_tokens");
  const Sequence* seq = sequences_.find(seq_id);
  return growth_blocks(seq, num_tokens) + (needs_copy_on_write(seq, num_tokens) ? 1 : 0);
}

bool BlockAllocator::can_allocate(SeqId seq_id, int64_t num_tokens) const {
  int64_t needed = blocks_needed(seq_id, num_tokens);
  return needed <= num_free_blocks();
}

// ---------------------------------------------------------------- allocation

void BlockAllocator::allocate(SeqId seq_id, int64_t num_tokens, const Hash128* keys, size_t num_keys,
                              std::vector<BlockId>& added) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_seq_id(seq_id, "seq_id");
  check_num_tokens(num_tokens, "num_tokens");
  Sequence* seq = sequences_.find(seq_id);
  bool use_keys = keys != nullptr && options_.enable_prefix_caching;
  if (use_keys && seq && seq->num_keyed_blocks > 0 && num_keys >= static_cast<size_t>(seq->num_keyed_blocks)) {
    KVSCHED_EXPECTS(keys[seq->num_keyed_blocks - 1] == seq->last_key, std::invalid_argument,
                    "block_keys do not extend the keys already given for seq_id ", seq_id);
  }
  size_t hits = 0;
  size_t max_hits = 0;
  int64_t hits_in_lru = 0;
  if (use_keys && !seq && num_tokens > 0) {
    // Leave at least one token to compute: the engine needs its logits.
    max_hits = static_cast<size_t>((num_tokens - 1) / options_.block_size);
    hits = match_prefix_locked(keys, num_keys, max_hits);
    for (size_t i = 0; i < hits; ++i) hits_in_lru += in_lru_[cached_blocks_.at(keys[i])];
  }
  int64_t needed = growth_blocks(seq, num_tokens) - static_cast<int64_t>(hits) +
                   (needs_copy_on_write(seq, num_tokens) ? 1 : 0);
  if (needed > free_pool_->size() + lru_size_ - hits_in_lru) throw_out_of_blocks(seq_id, needed);

  if (!seq) {
    seq = sequences_.try_emplace(seq_id).first;
    if (use_keys && num_tokens > 0) {
      ++counters_.prefix_queries;
      counters_.prefix_query_blocks += static_cast<int64_t>(std::min(num_keys, max_hits));
      counters_.prefix_hit_blocks += static_cast<int64_t>(hits);
    }
    size_t first = added.size();
    for (size_t i = 0; i < hits; ++i) {
      BlockId block = cached_blocks_.at(keys[i]);
      add_seq_ref(block);
      added.push_back(block);
    }
    append_blocks(*seq, added.data() + first, hits);
    if (hits > 0) {
      seq->num_tokens = seq->num_cached_tokens = static_cast<int64_t>(hits) * options_.block_size;
      seq->num_keyed_blocks = static_cast<int64_t>(hits);
      seq->last_key = keys[hits - 1];
    }
  }
  grow(seq_id, *seq, num_tokens, added);
  if (use_keys) register_keys(seq_id, *seq, keys, num_keys);
}

void BlockAllocator::allocate_batch(const SeqId* seq_ids, const int64_t* num_tokens, size_t count,
                                    std::vector<int64_t>& indptr, std::vector<BlockId>& added) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t stamp = ++batch_counter_;
  // New ids are inserted (empty) while checking, which also detects duplicates among them; a failed
  // check erases exactly those, so the call stays all or nothing.
  std::vector<Sequence*>& targets = batch_targets_;
  std::vector<SeqId>& inserted = batch_inserted_;
  targets.clear();
  inserted.clear();
  std::vector<BlockId> shared_tails;  // partial last blocks that will need a copy-on-write
  int64_t needed = 0;
  int64_t capacity = static_cast<int64_t>(options_.num_blocks) * options_.block_size;
  try {
    for (size_t i = 0; i < count; ++i) {
      SeqId id = seq_ids[i];
      int64_t tokens = num_tokens[i];
      KVSCHED_EXPECTS(id >= 0, std::invalid_argument, "seq_ids[", i, "] must be >= 0, got ", id);
      KVSCHED_EXPECTS(tokens >= 0 && tokens <= capacity, std::invalid_argument, "num_tokens[", i,
                      "] must be in [0, ", capacity, "], got ", tokens);
      auto [record, is_new] = sequences_.try_emplace(id);
      Sequence& seq = *record;
      if (is_new) {
        inserted.push_back(id);
        KVSCHED_EXPECTS(pins_.count(id) == 0, std::invalid_argument, "seq_ids[", i, "] = ", id,
                        " is pinned; restore() or unpin() it first");
      }
      KVSCHED_EXPECTS(seq.batch_stamp != stamp, std::invalid_argument, "seq_ids[", i, "] = ", id, " appears twice");
      seq.batch_stamp = stamp;
      targets.push_back(&seq);
      needed += growth_blocks(&seq, tokens);
      if (needs_copy_on_write(&seq, tokens)) shared_tails.push_back(seq.blocks.back());
    }
    // k sharers of one block copying it need min(k, refs - 1) copies: the last sharer writes in place.
    std::sort(shared_tails.begin(), shared_tails.end());
    for (size_t i = 0; i < shared_tails.size();) {
      size_t j = i;
      while (j < shared_tails.size() && shared_tails[j] == shared_tails[i]) ++j;
      BlockId block = shared_tails[i];
      needed += std::min<int64_t>(static_cast<int64_t>(j - i), seq_ref_[block] + pin_ref_[block] - 1);
      i = j;
    }
    if (needed > free_pool_->size() + lru_size_) {
      throw OutOfBlocks(detail::concat("allocate_batch needs ", needed, " blocks but only ",
                                       free_pool_->size() + lru_size_, " are available (", free_pool_->size(),
                                       " free, ", lru_size_, " cached)"));
    }
  } catch (...) {
    for (SeqId id : inserted) sequences_.erase(id, reset_sequence);
    throw;
  }
  indptr.reserve(indptr.size() + count + 1);
  added.reserve(added.size() + static_cast<size_t>(needed));
  indptr.push_back(static_cast<int64_t>(added.size()));
  for (size_t i = 0; i < count; ++i) {
    grow(seq_ids[i], *targets[i], num_tokens[i], added);
    indptr.push_back(static_cast<int64_t>(added.size()));
  }
}

void BlockAllocator::grow(SeqId seq_id, Sequence& seq, int64_t num_tokens, std::vector<BlockId>& added) {
  if (num_tokens <= seq.num_tokens) return;
  if (needs_copy_on_write(&seq, num_tokens)) {
    size_t last = seq.blocks.size() - 1;
    BlockId src = seq.blocks[last];
    std::vector<BlockId> copy;
    take_blocks(last > 0 ? seq.blocks[last - 1] : kNone, 1, copy);
    BlockId dst = copy[0];
    int32_t before = extent_starts(seq.blocks, last);
    seq.blocks[last] = dst;
    int32_t delta = extent_starts(seq.blocks, last) - before;
    seq.num_extents += delta;
    counters_.table_extents += delta;
    add_seq_ref(dst);
    if (drop_seq_ref(src)) release_block(src);
    pending_copies_.push_back(CopyOnWrite{seq_id, src, dst});
    ++counters_.copy_on_writes;
  }
  int64_t extra = growth_blocks(&seq, num_tokens);
  if (extra > 0) {
    size_t first = added.size();
    take_blocks(seq.blocks.empty() ? kNone : seq.blocks.back(), extra, added);
    for (size_t i = first; i < added.size(); ++i) add_seq_ref(added[i]);
    append_blocks(seq, added.data() + first, added.size() - first);
  }
  seq.num_tokens = num_tokens;
}

void BlockAllocator::take_blocks(BlockId after, int64_t count, std::vector<BlockId>& out) {
  int32_t from_pool = static_cast<int32_t>(std::min<int64_t>(count, free_pool_->size()));
  int32_t taken = after == kNone ? 0 : free_pool_->take_following(after, from_pool, out);
  if (from_pool > taken) free_pool_->take(from_pool - taken, out);
  for (int64_t k = from_pool; k < count; ++k) {
    BlockId block = lru_pop();
    cached_blocks_.erase(key_[block]);
    has_key_[block] = 0;
    ++counters_.cache_evictions;
    if (options_.track_evictions) evictions_.push_back({block, key_[block]});
    if (options_.track_cache_events) cache_events_.push_back({CacheEventKind::kRemoved, -1, -1, key_[block]});
    out.push_back(block);
  }
}

int32_t BlockAllocator::extent_starts(const std::vector<BlockId>& blocks, size_t index) {
  return index == 0 || blocks[index] != blocks[index - 1] + 1 ? 1 : 0;
}

void BlockAllocator::append_blocks(Sequence& seq, const BlockId* blocks, size_t count) {
  int32_t starts = 0;
  BlockId previous = seq.blocks.empty() ? kNone - 1 : seq.blocks.back();
  for (size_t i = 0; i < count; ++i) {
    starts += blocks[i] != previous + 1 ? 1 : 0;
    previous = blocks[i];
  }
  seq.blocks.insert(seq.blocks.end(), blocks, blocks + count);
  seq.num_extents += starts;
  counters_.table_extents += starts;
  counters_.table_blocks += static_cast<int64_t>(count);
}

void BlockAllocator::add_seq_ref(BlockId block) {
  if (seq_ref_[block] == 0) {
    if (in_lru_[block]) lru_remove(block);
    else if (pin_ref_[block] > 0) --num_pinned_only_;
  }
  ++seq_ref_[block];
}

bool BlockAllocator::drop_seq_ref(BlockId block) {
  if (--seq_ref_[block] > 0) return false;
  if (pin_ref_[block] > 0) {
    ++num_pinned_only_;
    return false;
  }
  return true;
}

bool BlockAllocator::drop_pin_ref(BlockId block) {
  if (--pin_ref_[block] > 0 || seq_ref_[block] > 0) return false;
  --num_pinned_only_;
  return true;
}

void BlockAllocator::release_block(BlockId block) {
  if (has_key_[block]) lru_push(block);
  else free_pool_->give(&block, 1);
}

void BlockAllocator::release_blocks(const std::vector<BlockId>& blocks, bool pinned) {
  // Keyed blocks enter the LRU tail-first, so a prefix's head (the part most likely shared) is
  // evicted last; plain blocks go back in table order so that runs merge in one step.
  std::vector<BlockId>& plain = scratch_;
  plain.clear();
  for (size_t i = blocks.size(); i-- > 0;) {
    BlockId block = blocks[i];
    if (!(pinned ? drop_pin_ref(block) : drop_seq_ref(block))) continue;
    if (has_key_[block]) lru_push(block);
    else plain.push_back(block);
  }
  std::reverse(plain.begin(), plain.end());
  free_pool_->give(plain.data(), plain.size());
}

void BlockAllocator::register_keys(SeqId seq_id, Sequence& seq, const Hash128* keys, size_t num_keys) {
  int64_t full = seq.num_tokens / options_.block_size;
  int64_t limit = std::min<int64_t>(full, static_cast<int64_t>(num_keys));
  for (int64_t i = seq.num_keyed_blocks; i < limit; ++i) {
    BlockId block = seq.blocks[i];
    // A block whose content is already cached elsewhere stays unkeyed: the first copy wins.
    if (has_key_[block] || cached_blocks_.count(keys[i])) continue;
    has_key_[block] = 1;
    key_[block] = keys[i];
    cached_blocks_.emplace(keys[i], block);
    if (options_.track_cache_events) cache_events_.push_back({CacheEventKind::kStored, seq_id, i, keys[i]});
  }
  if (limit > seq.num_keyed_blocks) {
    seq.num_keyed_blocks = limit;
    seq.last_key = keys[limit - 1];
  }
}

// ---------------------------------------------------------------- release, fork, pins

void BlockAllocator::free(SeqId seq_id, int64_t ttl_steps) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(ttl_steps >= 0, std::invalid_argument, "ttl_steps must be >= 0, got ", ttl_steps);
  KVSCHED_FIND_SEQUENCE(seq, seq_id, "seq_id");
  free_locked(seq_id, ttl_steps);
}

void BlockAllocator::free_batch(const SeqId* seq_ids, size_t count, int64_t ttl_steps) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(ttl_steps >= 0, std::invalid_argument, "ttl_steps must be >= 0, got ", ttl_steps);
  uint64_t stamp = ++batch_counter_;
  for (size_t i = 0; i < count; ++i) {
    Sequence* seq = sequences_.find(seq_ids[i]);
    KVSCHED_EXPECTS(seq != nullptr, UnknownId, "seq_ids[", i, "] = ", seq_ids[i],
                    pins_.count(seq_ids[i]) ? " is pinned, not live" : " is not a live sequence");
    KVSCHED_EXPECTS(seq->batch_stamp != stamp, std::invalid_argument, "seq_ids[", i, "] = ", seq_ids[i],
                    " appears twice");
    seq->batch_stamp = stamp;
  }
  for (size_t i = 0; i < count; ++i) free_locked(seq_ids[i], ttl_steps);
}

void BlockAllocator::free_locked(SeqId seq_id, int64_t ttl_steps) {
  Sequence& seq = *sequences_.find(seq_id);
  counters_.table_blocks -= static_cast<int64_t>(seq.blocks.size());
  counters_.table_extents -= seq.num_extents;
  if (ttl_steps == 0) {
    release_blocks(seq.blocks, /*pinned=*/false);
  } else {
    for (BlockId block : seq.blocks) ++pin_ref_[block];
    for (BlockId block : seq.blocks) drop_seq_ref(block);  // never releases: the pin holds a ref
    // A TTL past the end of the clock pins until unpinned (saturates, never wraps into the past).
    int64_t expires_at = ttl_steps > INT64_MAX - clock_ ? INT64_MAX : clock_ + ttl_steps;
    pin_expiry_.emplace(expires_at, seq_id);
    pins_.emplace(seq_id, Pin{std::move(seq), expires_at});
  }
  sequences_.erase(seq_id, reset_sequence);
}

void BlockAllocator::reset_sequence(Sequence& seq) {
  seq.blocks.clear();  // keeps its capacity for the next sequence in this slot
  seq.num_tokens = seq.num_cached_tokens = seq.num_keyed_blocks = 0;
  seq.last_key = Hash128{};
  seq.num_extents = 0;
  seq.batch_stamp = 0;
}

void BlockAllocator::fork(SeqId parent, SeqId child) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_FIND_SEQUENCE(source, parent, "parent_id");
  check_seq_id(child, "child_id");
  KVSCHED_EXPECTS(child != parent, std::invalid_argument, "child_id must differ from parent_id, both are ", child);
  KVSCHED_EXPECTS(sequences_.find(child) == nullptr, std::invalid_argument, "child_id ", child, " already exists");
  Sequence& copy = *sequences_.try_emplace(child).first;  // records have stable addresses
  copy = *source;
  copy.batch_stamp = 0;
  for (BlockId block : copy.blocks) add_seq_ref(block);
  counters_.table_blocks += static_cast<int64_t>(copy.blocks.size());
  counters_.table_extents += copy.num_extents;
}

int64_t BlockAllocator::advance_steps(int64_t steps) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(steps >= 0, std::invalid_argument, "steps must be >= 0, got ", steps);
  clock_ = steps > INT64_MAX - clock_ ? INT64_MAX : clock_ + steps;
  int64_t expired = 0;
  while (!pin_expiry_.empty() && pin_expiry_.top().first <= clock_) {
    auto [expires_at, seq_id] = pin_expiry_.top();
    pin_expiry_.pop();
    auto it = pins_.find(seq_id);
    if (it == pins_.end() || it->second.expires_at != expires_at) continue;  // restored or unpinned since
    release_blocks(it->second.sequence.blocks, /*pinned=*/true);
    pins_.erase(it);
    ++expired;
  }
  return expired;
}

void BlockAllocator::unpin(SeqId seq_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pins_.find(seq_id);
  KVSCHED_EXPECTS(it != pins_.end(), UnknownId, "seq_id ", seq_id, " is not pinned");
  release_blocks(it->second.sequence.blocks, /*pinned=*/true);
  pins_.erase(it);
}

void BlockAllocator::restore(SeqId seq_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pins_.find(seq_id);
  KVSCHED_EXPECTS(it != pins_.end(), UnknownId, "seq_id ", seq_id, " is not pinned");
  Sequence seq = std::move(it->second.sequence);
  pins_.erase(it);
  for (BlockId block : seq.blocks) add_seq_ref(block);
  for (BlockId block : seq.blocks) drop_pin_ref(block);  // never releases: the sequence holds a ref
  counters_.table_blocks += static_cast<int64_t>(seq.blocks.size());
  counters_.table_extents += seq.num_extents;
  seq.batch_stamp = 0;
  *sequences_.try_emplace(seq_id).first = std::move(seq);
}

// ---------------------------------------------------------------- prefix cache

size_t BlockAllocator::match_prefix_locked(const Hash128* keys, size_t num_keys, size_t max_blocks) const {
  if (!options_.enable_prefix_caching) return 0;
  size_t limit = std::min(num_keys, max_blocks);
  size_t hits = 0;
  while (hits < limit && cached_blocks_.count(keys[hits])) ++hits;
  return hits;
}

void BlockAllocator::match_prefix(const Hash128* keys, size_t num_keys, std::vector<BlockId>& hits) const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t count = match_prefix_locked(keys, num_keys, num_keys);
  for (size_t i = 0; i < count; ++i) hits.push_back(cached_blocks_.at(keys[i]));
}

void BlockAllocator::hash_tokens(const int32_t* tokens, size_t num_tokens, uint64_t salt,
                                 std::vector<Hash128>& keys) const {
  size_t first = keys.size();
  keys.resize(first + num_tokens / static_cast<size_t>(options_.block_size));
  hash_full_blocks(options_.hash_algorithm, salt, tokens, num_tokens, options_.block_size, keys.data() + first);
}

int64_t BlockAllocator::reset_prefix_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t dropped = static_cast<int64_t>(cached_blocks_.size());
  std::vector<BlockId>& plain = scratch_;
  plain.clear();
  while (lru_size_ > 0) plain.push_back(lru_pop());
  std::sort(plain.begin(), plain.end());
  for (auto& entry : cached_blocks_) has_key_[entry.second] = 0;
  cached_blocks_.clear();
  free_pool_->give(plain.data(), plain.size());
  if (options_.track_cache_events) cache_events_.push_back({CacheEventKind::kCleared, -1, -1, Hash128{}});
  return dropped;
}

void BlockAllocator::lru_push(BlockId block) {
  lru_prev_[block] = lru_tail_;
  lru_next_[block] = kNone;
  if (lru_tail_ != kNone) lru_next_[lru_tail_] = block; else lru_head_ = block;
  lru_tail_ = block;
  in_lru_[block] = 1;
  ++lru_size_;
}

void BlockAllocator::lru_remove(BlockId block) {
  int32_t prev = lru_prev_[block], next = lru_next_[block];
  if (prev != kNone) lru_next_[prev] = next; else lru_head_ = next;
  if (next != kNone) lru_prev_[next] = prev; else lru_tail_ = prev;
  in_lru_[block] = 0;
  --lru_size_;
}

BlockId BlockAllocator::lru_pop() {
  BlockId block = lru_head_;
  KVSCHED_ASSERT(block != kNone, "lru_pop on an empty LRU");
  lru_remove(block);
  return block;
}

// ---------------------------------------------------------------- reporting

void BlockAllocator::pop_evictions(std::vector<Eviction>& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  out.clear();
  out.swap(evictions_);
}

void BlockAllocator::pop_cache_events(std::vector<CacheEvent>& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  out.clear();
  out.swap(cache_events_);
}

void BlockAllocator::cached_keys(std::vector<Hash128>& out) const {
  std::lock_guard<std::mutex> lock(mutex_);
  out.reserve(out.size() + cached_blocks_.size());
  for (const auto& entry : cached_blocks_) out.push_back(entry.first);
}

std::vector<CopyOnWrite> BlockAllocator::pop_copy_on_writes() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<CopyOnWrite> out;
  out.swap(pending_copies_);
  return out;
}

BlockAllocatorStats BlockAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  BlockAllocatorStats s = counters_;
  s.num_blocks = options_.num_blocks;
  s.num_free = free_pool_->size();
  s.num_cached = lru_size_;
  s.num_pinned = num_pinned_only_;
  s.num_used = options_.num_blocks - s.num_free - s.num_cached - s.num_pinned;
  s.num_sequences = static_cast<int64_t>(sequences_.size());
  s.num_pinned_sequences = static_cast<int64_t>(pins_.size());
  return s;
}

void BlockAllocator::check_invariants() const {
  std::lock_guard<std::mutex> lock(mutex_);
  free_pool_->check_invariants();
  size_t n = static_cast<size_t>(options_.num_blocks);
  std::vector<int32_t> seq_refs(n, 0), pin_refs(n, 0);
  int64_t table_blocks = 0, table_extents = 0;
  auto check_sequence = [&](SeqId id, const Sequence& seq, std::vector<int32_t>& refs) {
    KVSCHED_ASSERT(static_cast<int64_t>(seq.blocks.size()) == ceil_div(seq.num_tokens, options_.block_size),
                   "seq ", id, " holds ", seq.blocks.size(), " blocks for ", seq.num_tokens, " tokens");
    KVSCHED_ASSERT(seq.num_keyed_blocks <= seq.num_tokens / options_.block_size, "seq ", id, " keyed past full blocks");
    int32_t extents = 0;
    for (size_t i = 0; i < seq.blocks.size(); ++i) {
      BlockId block = seq.blocks[i];
      KVSCHED_ASSERT(block >= 0 && block < options_.num_blocks, "seq ", id, " holds block ", block);
      ++refs[block];
      extents += extent_starts(seq.blocks, i);
    }
    KVSCHED_ASSERT(extents == seq.num_extents, "seq ", id, " counts ", seq.num_extents, " extents, has ", extents);
  };
  sequences_.for_each([&](SeqId id, const Sequence& seq) {
    check_sequence(id, seq, seq_refs);
    table_blocks += static_cast<int64_t>(seq.blocks.size());
    table_extents += seq.num_extents;
  });
  for (const auto& [id, pin] : pins_) check_sequence(id, pin.sequence, pin_refs);
  KVSCHED_ASSERT(table_blocks == counters_.table_blocks && table_extents == counters_.table_extents,
                 "table totals drifted");
  int32_t free = 0, cached = 0, pinned = 0;
  for (size_t b = 0; b < n; ++b) {
    BlockId block = static_cast<BlockId>(b);
    KVSCHED_ASSERT(seq_refs[b] == seq_ref_[b], "block ", b, " seq_ref ", seq_ref_[b], " but tables hold ", seq_refs[b]);
    KVSCHED_ASSERT(pin_refs[b] == pin_ref_[b], "block ", b, " pin_ref ", pin_ref_[b], " but pins hold ", pin_refs[b]);
    bool unreferenced = seq_ref_[b] == 0 && pin_ref_[b] == 0;
    if (free_pool_->is_free(block)) {
      KVSCHED_ASSERT(unreferenced && !has_key_[b] && !in_lru_[b], "free block ", b, " is also referenced or keyed");
      ++free;
    } else if (in_lru_[b]) {
      KVSCHED_ASSERT(unreferenced && has_key_[b], "cached block ", b, " is referenced or has no key");
      ++cached;
    } else {
      KVSCHED_ASSERT(!unreferenced, "block ", b, " is in no state: unreferenced, not free, not cached");
      if (seq_ref_[b] == 0) ++pinned;
    }
    if (has_key_[b]) {
      auto it = cached_blocks_.find(key_[b]);
      KVSCHED_ASSERT(it != cached_blocks_.end() && it->second == block, "keyed block ", b, " not findable");
    }
  }
  KVSCHED_ASSERT(free == free_pool_->size() && cached == lru_size_ && pinned == num_pinned_only_,
                 "state counts drifted: free ", free, "/", free_pool_->size(), " cached ", cached, "/", lru_size_,
                 " pinned ", pinned, "/", num_pinned_only_);
  int32_t walked = 0;
  for (int32_t b = lru_head_, prev = kNone; b != kNone; prev = b, b = lru_next_[b]) {
    KVSCHED_ASSERT(in_lru_[b] && lru_prev_[b] == prev, "LRU list broken at block ", b);
    KVSCHED_ASSERT(++walked <= lru_size_, "LRU list longer than its size");
  }
  KVSCHED_ASSERT(walked == lru_size_, "LRU list holds ", walked, " blocks, size says ", lru_size_);
  for (const auto& [key, block] : cached_blocks_) {
    KVSCHED_ASSERT(has_key_[block] && key_[block] == key, "cache entry points at block ", block, " with another key");
  }
}

}  // namespace kvsched
