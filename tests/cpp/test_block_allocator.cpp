// BlockAllocator invariants (cpp/include/kvsched/block_allocator.h), through the C++ API.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <new>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kvsched/block_allocator.h"
#include "kvsched/block_hash.h"
#include "kvsched/errors.h"

namespace kvsched {
namespace {

BlockAllocatorOptions options_with(int32_t num_blocks, int32_t block_size, Placement placement = Placement::kContiguous) {
  BlockAllocatorOptions o;
  o.num_blocks = num_blocks;
  o.block_size = block_size;
  o.placement = placement;
  return o;
}

// Chained keys of `num_blocks` full blocks of a synthetic prompt family (equal family: equal content).
std::vector<Hash128> family_keys(const BlockAllocator& allocator, int family, int num_blocks) {
  const int32_t bs = allocator.options().block_size;
  std::vector<int32_t> tokens(static_cast<size_t>(num_blocks) * static_cast<size_t>(bs));
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = family * 100003 + static_cast<int32_t>(i);
  std::vector<Hash128> keys;
  allocator.hash_tokens(tokens.data(), tokens.size(), /*salt=*/0, keys);
  return keys;
}

// What a failing call must not change: every state count and the tables of the given sequences.
struct Snapshot {
  BlockAllocatorStats stats;
  int32_t num_free_blocks = 0;
  std::map<SeqId, std::vector<BlockId>> tables;
  std::map<SeqId, int64_t> tokens;
};

Snapshot snapshot(const BlockAllocator& a, const std::vector<SeqId>& ids) {
  Snapshot s;
  s.stats = a.stats();
  s.num_free_blocks = a.num_free_blocks();
  for (SeqId id : ids) {
    if (!a.contains(id)) continue;
    s.tables[id] = a.block_table(id);
    s.tokens[id] = a.num_tokens(id);
  }
  return s;
}

void expect_same(const Snapshot& before, const Snapshot& after) {
  EXPECT_EQ(before.stats.num_free, after.stats.num_free);
  EXPECT_EQ(before.stats.num_cached, after.stats.num_cached);
  EXPECT_EQ(before.stats.num_pinned, after.stats.num_pinned);
  EXPECT_EQ(before.stats.num_used, after.stats.num_used);
  EXPECT_EQ(before.stats.num_sequences, after.stats.num_sequences);
  EXPECT_EQ(before.stats.num_pinned_sequences, after.stats.num_pinned_sequences);
  EXPECT_EQ(before.stats.table_blocks, after.stats.table_blocks);
  EXPECT_EQ(before.stats.table_extents, after.stats.table_extents);
  EXPECT_EQ(before.stats.copy_on_writes, after.stats.copy_on_writes);
  EXPECT_EQ(before.num_free_blocks, after.num_free_blocks);
  EXPECT_EQ(before.tables, after.tables);
  EXPECT_EQ(before.tokens, after.tokens);
}

// The four states partition the pool, and `used` is exactly the blocks live tables hold.
void expect_conserved(const BlockAllocator& a, const std::vector<SeqId>& live) {
  BlockAllocatorStats s = a.stats();
  EXPECT_EQ(s.num_free + s.num_cached + s.num_pinned + s.num_used, s.num_blocks);
  EXPECT_GE(s.num_free, 0);
  EXPECT_GE(s.num_cached, 0);
  EXPECT_GE(s.num_pinned, 0);
  EXPECT_GE(s.num_used, 0);
  EXPECT_EQ(a.num_free_blocks(), s.num_free + s.num_cached);
  std::set<BlockId> held;
  int64_t table_blocks = 0;
  for (SeqId id : live) {
    std::vector<BlockId> table = a.block_table(id);
    const int64_t bs = a.options().block_size;
    EXPECT_EQ(static_cast<int64_t>(table.size()), (a.num_tokens(id) + bs - 1) / bs) << "seq " << id;
    table_blocks += static_cast<int64_t>(table.size());
    held.insert(table.begin(), table.end());
  }
  EXPECT_EQ(static_cast<int64_t>(held.size()), s.num_used);
  EXPECT_EQ(table_blocks, s.table_blocks);
  EXPECT_EQ(static_cast<int64_t>(live.size()), s.num_sequences);
  EXPECT_NO_THROW(a.check_invariants());
}

// Why: a block lost or counted twice is KV memory silently leaked or shared between requests.
// Random allocate / grow / free / fork / pin / restore / expire operations, with prefix keys so
// that blocks are shared and cached too; after every one the pool is a partition and the internal
// consistency check passes. A call that throws must change nothing.
TEST(BlockAllocator, RandomOperationsConserveBlocks) {
  for (Placement placement : {Placement::kContiguous, Placement::kLifo, Placement::kFifo}) {
    SCOPED_TRACE(static_cast<int>(placement));
    BlockAllocatorOptions o = options_with(48, 4, placement);
    BlockAllocator a(o);
    const int kFamilies = 3, kMaxBlocks = 12;
    std::vector<std::vector<Hash128>> keys;
    for (int f = 0; f < kFamilies; ++f) keys.push_back(family_keys(a, f, kMaxBlocks));
    std::mt19937 rng(1234 + static_cast<unsigned>(placement));
    std::map<SeqId, int> family;  // live and pinned sequences
    std::set<SeqId> live, pinned;
    int64_t out_of_blocks = 0, copies = 0;
    for (int op = 0; op < 3000; ++op) {
      SeqId id = static_cast<SeqId>(rng() % 16);
      const int kind = static_cast<int>(rng() % 10);
      std::vector<SeqId> ids(live.begin(), live.end());
      Snapshot before = snapshot(a, ids);
      try {
        if (kind <= 4) {  // allocate or grow
          if (pinned.count(id)) continue;
          int64_t now = live.count(id) ? a.num_tokens(id) : 0;
          int64_t want = std::min<int64_t>(now + 1 + rng() % 9, int64_t{kMaxBlocks} * o.block_size);
          // A live sequence keeps its family's keys (-1: created without keys, grows without).
          int f = family.count(id) ? family[id] : static_cast<int>(rng() % kFamilies);
          const bool with_keys = f >= 0 && (live.count(id) != 0 || rng() % 4 != 0);
          std::vector<BlockId> added;
          a.allocate(id, want, with_keys ? keys[f].data() : nullptr, with_keys ? keys[f].size() : 0, added);
          if (!live.count(id)) family[id] = with_keys ? f : -1;
          live.insert(id);
          EXPECT_EQ(a.num_tokens(id), std::max(now, want));
        } else if (kind == 5) {  // free
          if (!live.count(id)) continue;
          a.free(id);
          live.erase(id);
          family.erase(id);
        } else if (kind == 6) {  // free with a TTL pin
          if (!live.count(id)) continue;
          a.free(id, 1 + static_cast<int64_t>(rng() % 4));
          live.erase(id);
          pinned.insert(id);
        } else if (kind == 7) {  // fork into a new id
          SeqId child = 16 + static_cast<SeqId>(rng() % 16);
          if (!live.count(id) || live.count(child) || pinned.count(child)) continue;
          a.fork(id, child);
          live.insert(child);
          family[child] = family[id];
          EXPECT_EQ(a.block_table(child), a.block_table(id));
        } else if (kind == 8) {  // restore or unpin a pin
          if (pinned.empty()) continue;
          SeqId p = *pinned.begin();
          if (rng() % 2) {
            a.restore(p);
            live.insert(p);
          } else {
            a.unpin(p);
            family.erase(p);
          }
          pinned.erase(p);
        } else {  // the clock moves; expired pins release their blocks
          a.advance_steps(1);
          for (auto it = pinned.begin(); it != pinned.end();) {
            if (!a.is_pinned(*it)) {
              family.erase(*it);
              it = pinned.erase(it);
            } else {
              ++it;
            }
          }
        }
      } catch (const OutOfBlocks&) {
        ++out_of_blocks;
        expect_same(before, snapshot(a, ids));
      }
      copies += static_cast<int64_t>(a.pop_copy_on_writes().size());
      std::vector<SeqId> now(live.begin(), live.end());
      expect_conserved(a, now);
      if (::testing::Test::HasFailure()) FAIL() << "after operation " << op;
    }
    // The workload did reach every interesting state.
    EXPECT_GT(out_of_blocks, 0);
    EXPECT_GT(copies, 0);
    EXPECT_GT(a.stats().prefix_hit_blocks, 0);
    // Releasing everything returns every block (free or cached, nothing used or pinned).
    for (SeqId id : live) a.free(id);
    for (SeqId id : pinned) a.unpin(id);
    BlockAllocatorStats s = a.stats();
    EXPECT_EQ(s.num_used, 0);
    EXPECT_EQ(s.num_pinned, 0);
    EXPECT_EQ(s.num_free + s.num_cached, s.num_blocks);
    EXPECT_EQ(s.table_blocks, 0);
    EXPECT_NO_THROW(a.check_invariants());
  }
}

// Why: running out of KV is an expected condition the scheduler recovers from by preempting; it
// must be the OutOfBlocks type (a std::bad_alloc, not a crash or a logic_error) and change nothing.
TEST(BlockAllocator, OutOfBlocksIsTypedAndChangesNothing) {
  BlockAllocator a(options_with(8, 4));
  std::vector<BlockId> added;
  a.allocate(1, 20, nullptr, 0, added);  // 5 blocks
  a.allocate(2, 9, nullptr, 0, added);   // 3 blocks: the pool is full
  ASSERT_EQ(a.num_free_blocks(), 0);
  EXPECT_FALSE(a.can_allocate(1, 21));
  EXPECT_EQ(a.blocks_needed(1, 21), 1);
  EXPECT_EQ(a.blocks_needed(1, 20), 0);
  Snapshot before = snapshot(a, {1, 2, 3});
  added.clear();
  EXPECT_THROW(a.allocate(1, 21, nullptr, 0, added), OutOfBlocks);
  EXPECT_THROW(a.allocate(3, 1, nullptr, 0, added), std::bad_alloc);  // the standard base type
  EXPECT_TRUE(added.empty());
  EXPECT_FALSE(a.contains(3));  // a new sequence that did not fit is not created
  expect_same(before, snapshot(a, {1, 2, 3}));

  // Batched: all or nothing, new ids of the failed batch included.
  a.free(2);
  before = snapshot(a, {1, 2, 4, 5});
  std::vector<SeqId> ids = {4, 5, 1};
  std::vector<int64_t> tokens = {4, 4, 24};  // 1 + 1 + 1 blocks, only 3 free: fits
  std::vector<int64_t> tokens_too_many = {4, 8, 24};  // 1 + 2 + 1 > 3
  std::vector<int64_t> indptr;
  EXPECT_THROW(a.allocate_batch(ids.data(), tokens_too_many.data(), ids.size(), indptr, added), OutOfBlocks);
  EXPECT_FALSE(a.contains(4));
  EXPECT_FALSE(a.contains(5));
  EXPECT_TRUE(indptr.empty());
  expect_same(before, snapshot(a, {1, 2, 4, 5}));
  a.allocate_batch(ids.data(), tokens.data(), ids.size(), indptr, added);
  ASSERT_EQ(indptr.size(), 4u);
  EXPECT_EQ(indptr.back(), 3);
  EXPECT_EQ(a.num_free_blocks(), 0);
  EXPECT_NO_THROW(a.check_invariants());
}

// Why: every call validates all of its input before changing anything (errors.h); the binding
// layer relies on it to turn errors into Python exceptions with the allocator still usable.
TEST(BlockAllocator, BadArgumentsThrowAndChangeNothing) {
  EXPECT_THROW(BlockAllocator(options_with(0, 16)), std::invalid_argument);
  EXPECT_THROW(BlockAllocator(options_with(8, 0)), std::invalid_argument);
  EXPECT_THROW(BlockAllocator(options_with(8, 16, static_cast<Placement>(7))), std::invalid_argument);

  BlockAllocator a(options_with(16, 4));
  std::vector<Hash128> keys = family_keys(a, 1, 4);
  std::vector<Hash128> other = family_keys(a, 2, 4);
  std::vector<BlockId> added;
  a.allocate(1, 9, keys.data(), keys.size(), added);
  a.allocate(2, 3, nullptr, 0, added);
  a.allocate(3, 6, nullptr, 0, added);
  a.free(3, /*ttl_steps=*/5);  // pinned
  const std::vector<SeqId> ids = {1, 2, 3, 7};
  Snapshot before = snapshot(a, ids);
  added.clear();
  std::vector<int64_t> indptr;

  EXPECT_THROW(a.allocate(-1, 4, nullptr, 0, added), std::invalid_argument);
  EXPECT_THROW(a.allocate(7, -1, nullptr, 0, added), std::invalid_argument);
  EXPECT_THROW(a.allocate(7, 16 * 4 + 1, nullptr, 0, added), std::invalid_argument);  // past capacity
  EXPECT_THROW(a.allocate(3, 8, nullptr, 0, added), std::invalid_argument);           // pinned id
  EXPECT_THROW(a.allocate(1, 12, other.data(), other.size(), added), std::invalid_argument);  // keys do not extend
  EXPECT_THROW(a.free(7), UnknownId);
  EXPECT_THROW(a.free(3), UnknownId);  // pinned, not live
  EXPECT_THROW(a.free(1, -1), std::invalid_argument);
  EXPECT_THROW(a.fork(7, 8), UnknownId);
  EXPECT_THROW(a.fork(1, 1), std::invalid_argument);
  EXPECT_THROW(a.fork(1, 2), std::invalid_argument);  // child exists
  EXPECT_THROW(a.fork(1, 3), std::invalid_argument);  // child pinned
  EXPECT_THROW(a.unpin(1), UnknownId);
  EXPECT_THROW(a.restore(7), UnknownId);
  EXPECT_THROW(a.advance_steps(-1), std::invalid_argument);
  EXPECT_THROW(a.block_table(7), UnknownId);
  {
    std::vector<SeqId> dup = {7, 7};
    std::vector<int64_t> tokens = {1, 1};
    EXPECT_THROW(a.allocate_batch(dup.data(), tokens.data(), 2, indptr, added), std::invalid_argument);
    std::vector<SeqId> bad = {7, 1};
    std::vector<int64_t> bad_tokens = {1, -5};
    EXPECT_THROW(a.allocate_batch(bad.data(), bad_tokens.data(), 2, indptr, added), std::invalid_argument);
    std::vector<SeqId> with_pin = {7, 3};
    EXPECT_THROW(a.allocate_batch(with_pin.data(), tokens.data(), 2, indptr, added), std::invalid_argument);
    std::vector<SeqId> free_dup = {1, 1};
    EXPECT_THROW(a.free_batch(free_dup.data(), 2), std::invalid_argument);
    std::vector<SeqId> free_unknown = {1, 7};
    EXPECT_THROW(a.free_batch(free_unknown.data(), 2), UnknownId);
  }
  EXPECT_TRUE(added.empty());
  EXPECT_TRUE(indptr.empty());
  EXPECT_FALSE(a.contains(7));
  EXPECT_FALSE(a.contains(8));
  EXPECT_TRUE(a.is_pinned(3));
  expect_same(before, snapshot(a, ids));
  EXPECT_NO_THROW(a.check_invariants());
}

// Why: the prefix cache is what saves prefill work; a released full block must stay findable by its
// key until an allocation actually needs it, plain free blocks must be used before cached ones,
// and eviction goes least recently released first, a prefix's tail before its head.
TEST(BlockAllocator, ReleasedFullBlocksStayFindableUntilReused) {
  BlockAllocator a(options_with(8, 4));
  std::vector<Hash128> keys = family_keys(a, 1, 4);
  std::vector<BlockId> prompt;
  a.allocate(1, 13, keys.data(), keys.size(), prompt);  // 3 full keyed blocks + 1 partial
  ASSERT_EQ(prompt.size(), 4u);
  a.free(1);
  BlockAllocatorStats s = a.stats();
  EXPECT_EQ(s.num_cached, 3);  // the partial block has no key: plain free
  EXPECT_EQ(s.num_free, 5);
  std::vector<BlockId> hits;
  a.match_prefix(keys.data(), keys.size(), hits);
  EXPECT_EQ(hits, std::vector<BlockId>(prompt.begin(), prompt.begin() + 3));

  // Plain free blocks go first: taking all 5 leaves the cached ones findable.
  std::vector<BlockId> added;
  a.allocate(2, 20, nullptr, 0, added);
  for (BlockId b : added) EXPECT_EQ(std::count(prompt.begin(), prompt.begin() + 3, b), 0) << b;
  hits.clear();
  a.match_prefix(keys.data(), keys.size(), hits);
  EXPECT_EQ(hits.size(), 3u);
  EXPECT_EQ(a.stats().cache_evictions, 0);

  // One more block must evict: the prefix's last block goes first.
  added.clear();
  a.allocate(2, 21, nullptr, 0, added);
  ASSERT_EQ(added.size(), 1u);
  EXPECT_EQ(added[0], prompt[2]);
  EXPECT_EQ(a.stats().cache_evictions, 1);
  hits.clear();
  a.match_prefix(keys.data(), keys.size(), hits);
  EXPECT_EQ(hits, std::vector<BlockId>(prompt.begin(), prompt.begin() + 2));

  // A new sequence with the same keys shares what is left, and computes the rest. (Its hits do
  // not count as available room: with sequence 2 live it would not fit.)
  added.clear();
  EXPECT_THROW(a.allocate(3, 9, keys.data(), keys.size(), added), OutOfBlocks);
  a.free(2);
  a.allocate(3, 9, keys.data(), keys.size(), added);  // 2 hits (8 tokens) + 1 new block
  EXPECT_EQ(a.num_cached_tokens(3), 8);
  std::vector<BlockId> table = a.block_table(3);
  ASSERT_EQ(table.size(), 3u);
  EXPECT_EQ(table[0], prompt[0]);
  EXPECT_EQ(table[1], prompt[1]);
  EXPECT_EQ(a.stats().num_cached, 0);  // hit blocks are used now, not evictable
  EXPECT_NO_THROW(a.check_invariants());
}

// Why: the engine needs the logits of the prompt's last token, so a full-prompt hit still leaves
// one token (and so the last block) to compute.
TEST(BlockAllocator, PrefixHitLeavesOneTokenToCompute) {
  BlockAllocator a(options_with(16, 4));
  std::vector<Hash128> keys = family_keys(a, 1, 2);
  std::vector<BlockId> added;
  a.allocate(1, 8, keys.data(), keys.size(), added);
  a.allocate(2, 8, keys.data(), keys.size(), added);  // same 8-token prompt while 1 is live
  EXPECT_EQ(a.num_cached_tokens(2), 4);  // one block shared, the second computed again
  std::vector<BlockId> t1 = a.block_table(1), t2 = a.block_table(2);
  EXPECT_EQ(t1[0], t2[0]);
  EXPECT_NE(t1[1], t2[1]);
  // The duplicate content stays unkeyed: the first copy wins, nothing is registered twice.
  a.free(2);
  EXPECT_EQ(a.stats().num_cached, 0);
  EXPECT_NO_THROW(a.check_invariants());
}

// Why: forked sequences (parallel sampling, beam search) share blocks by reference; a write into
// a shared partial block must copy it first (copy-on-write) and every reference must be counted,
// or one sequence overwrites another's KV or a block is freed while still in use.
TEST(BlockAllocator, ForkSharesBlocksAndCopiesOnWrite) {
  BlockAllocator a(options_with(16, 4));
  std::vector<BlockId> added;
  a.allocate(1, 6, nullptr, 0, added);  // a full block and a partial one
  const std::vector<BlockId> parent = a.block_table(1);
  a.fork(1, 2);
  EXPECT_EQ(a.block_table(2), parent);
  BlockAllocatorStats s = a.stats();
  EXPECT_EQ(s.num_used, 2);      // shared, counted once
  EXPECT_EQ(s.table_blocks, 4);  // but held by two tables

  EXPECT_EQ(a.blocks_needed(2, 7), 1);  // writing into the shared partial block needs a copy
  EXPECT_EQ(a.blocks_needed(2, 6), 0);  // no write, no copy
  added.clear();
  a.allocate(2, 7, nullptr, 0, added);
  EXPECT_TRUE(added.empty());  // the copy replaces the last block; no block is appended
  std::vector<CopyOnWrite> copies = a.pop_copy_on_writes();
  ASSERT_EQ(copies.size(), 1u);
  std::vector<BlockId> child = a.block_table(2);
  EXPECT_EQ(copies[0].seq_id, 2);
  EXPECT_EQ(copies[0].src, parent[1]);
  EXPECT_EQ(copies[0].dst, child[1]);
  EXPECT_EQ(child[0], parent[0]);  // the full block stays shared
  EXPECT_NE(child[1], parent[1]);
  EXPECT_EQ(a.block_table(1), parent);
  EXPECT_EQ(a.stats().copy_on_writes, 1);
  EXPECT_EQ(a.stats().num_used, 3);

  // The parent is now the only holder of its partial block: it writes in place.
  EXPECT_EQ(a.blocks_needed(1, 7), 0);
  a.allocate(1, 7, nullptr, 0, added);
  EXPECT_TRUE(a.pop_copy_on_writes().empty());

  // A fork of a full last block needs no copy: growth appends a fresh block.
  a.allocate(1, 8, nullptr, 0, added);
  a.fork(1, 3);
  added.clear();
  a.allocate(3, 9, nullptr, 0, added);
  EXPECT_EQ(added.size(), 1u);
  EXPECT_TRUE(a.pop_copy_on_writes().empty());

  // The shared block outlives each holder until the last one is freed.
  a.free(1);
  a.free(3);
  EXPECT_EQ(a.stats().num_used, 2);  // sequence 2's two blocks
  a.free(2);
  EXPECT_EQ(a.stats().num_used, 0);
  EXPECT_EQ(a.num_free_blocks(), 16);
  EXPECT_NO_THROW(a.check_invariants());
}

// Why: contiguous block tables make swap copies few and large (one extent per sequence); a growing
// sequence takes the block right after its last one when that block is free.
TEST(BlockAllocator, GrowingSequencesStayContiguous) {
  BlockAllocator a(options_with(256, 4));
  const std::vector<SeqId> ids = {1, 2, 3, 4};
  std::vector<BlockId> added;
  for (int round = 1; round <= 10; ++round) {
    for (SeqId id : ids) {
      std::vector<BlockId> before = round > 1 ? a.block_table(id) : std::vector<BlockId>{};
      added.clear();
      a.allocate(id, 4 * round, nullptr, 0, added);
      ASSERT_EQ(added.size(), 1u);
      if (!before.empty()) {
        EXPECT_EQ(added[0], before.back() + 1) << "seq " << id << " round " << round;
      }
    }
  }
  for (SeqId id : ids) {
    std::vector<BlockId> t = a.block_table(id);
    for (size_t i = 1; i < t.size(); ++i) EXPECT_EQ(t[i], t[0] + static_cast<BlockId>(i));
  }
  EXPECT_EQ(a.stats().table_extents, static_cast<int64_t>(ids.size()));

  EXPECT_NO_THROW(a.check_invariants());
}

// Why: a TTL pin keeps a finished turn's KV for the next one; its blocks are neither free nor
// used, and they come back exactly when the pin expires.
TEST(BlockAllocator, PinsHoldBlocksUntilTheyExpire) {
  BlockAllocator a(options_with(16, 4));
  std::vector<BlockId> added;
  a.allocate(1, 10, nullptr, 0, added);  // 3 blocks
  const std::vector<BlockId> table = a.block_table(1);
  a.free(1, /*ttl_steps=*/2);
  EXPECT_FALSE(a.contains(1));
  EXPECT_TRUE(a.is_pinned(1));
  EXPECT_EQ(a.stats().num_pinned, 3);
  EXPECT_EQ(a.num_free_blocks(), 13);
  EXPECT_EQ(a.advance_steps(1), 0);
  EXPECT_EQ(a.stats().num_pinned, 3);
  EXPECT_EQ(a.advance_steps(1), 1);
  EXPECT_FALSE(a.is_pinned(1));
  EXPECT_EQ(a.stats().num_pinned, 0);
  EXPECT_EQ(a.num_free_blocks(), 16);

  a.allocate(2, 10, nullptr, 0, added);
  const std::vector<BlockId> table2 = a.block_table(2);
  a.free(2, 5);
  a.restore(2);  // the same table comes back
  EXPECT_EQ(a.block_table(2), table2);
  EXPECT_EQ(a.num_tokens(2), 10);
  EXPECT_EQ(a.advance_steps(10), 0);  // the restored sequence's old expiry is ignored
  EXPECT_TRUE(a.contains(2));
  EXPECT_NO_THROW(a.check_invariants());
}

// Why: "every public method takes an internal mutex": concurrent calls on distinct sequences must
// leave the allocator consistent (a data race here would corrupt the free pool).
TEST(BlockAllocator, ConcurrentCallsAreSerialized) {
  BlockAllocator a(options_with(256, 4));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&a, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      std::vector<BlockId> added;
      for (int i = 0; i < 400; ++i) {
        SeqId id = t * 1000 + (i % 8);
        if (a.contains(id) && rng() % 3 == 0) {
          a.free(id);
        } else {
          int64_t now = a.contains(id) ? a.num_tokens(id) : 0;
          added.clear();
          try {
            a.allocate(id, std::min<int64_t>(now + 1 + rng() % 8, 40), nullptr, 0, added);
          } catch (const OutOfBlocks&) {
          }
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  BlockAllocatorStats s = a.stats();
  EXPECT_EQ(s.num_free + s.num_cached + s.num_pinned + s.num_used, s.num_blocks);
  EXPECT_NO_THROW(a.check_invariants());
}

}  // namespace
}  // namespace kvsched
