#include "free_pool.h"

#include <cstring>

#include "kvsched/errors.h"

namespace kvsched {
namespace {
constexpr int32_t kNone = -1;
// How many runs of the top size class are compared when looking for the largest one: the bins are
// only accurate to a factor of two, a short scan narrows that at bounded cost.
constexpr int kLargestRunScan = 8;
}  // namespace

FreePool::FreePool(int32_t num_blocks, Placement placement)
    : num_blocks_(num_blocks), placement_(placement), free_flag_(static_cast<size_t>(num_blocks), 0) {
  for (int32_t& head : bin_head_) head = kNone;
  if (placement_ == Placement::kContiguous) {
    run_length_.assign(num_blocks, 0);
    run_start_.assign(num_blocks, kNone);
    bin_next_.assign(num_blocks, kNone);
    bin_prev_.assign(num_blocks, kNone);
    give_run(0, num_blocks);
  } else {
    ring_.resize(static_cast<size_t>(num_blocks));
    // Both lists hand out ascending ids from a fresh pool, as real free lists do.
    for (int32_t b = 0; b < num_blocks; ++b) ring_[b] = placement == Placement::kLifo ? num_blocks - 1 - b : b;
    num_free_ = num_blocks;
    std::memset(free_flag_.data(), 1, free_flag_.size());
  }
}

int FreePool::bin_of(int32_t length) { return 31 - __builtin_clz(static_cast<uint32_t>(length)); }

void FreePool::link_run(BlockId start, int32_t length) {
  run_length_[start] = length;
  run_start_[start + length - 1] = start;
  int bin = bin_of(length);
  bin_prev_[start] = kNone;
  bin_next_[start] = bin_head_[bin];
  if (bin_head_[bin] != kNone) bin_prev_[bin_head_[bin]] = start;
  bin_head_[bin] = start;
  nonempty_bins_ |= 1u << bin;
}

void FreePool::unlink_run(BlockId start) {
  int bin = bin_of(run_length_[start]);
  int32_t prev = bin_prev_[start], next = bin_next_[start];
  if (prev != kNone) bin_next_[prev] = next; else bin_head_[bin] = next;
  if (next != kNone) bin_prev_[next] = prev;
  if (bin_head_[bin] == kNone) nonempty_bins_ &= ~(1u << bin);
}

void FreePool::mark(BlockId start, int32_t length, uint8_t flag) {
  std::memset(free_flag_.data() + start, flag, static_cast<size_t>(length));
}

void FreePool::give_run(BlockId start, int32_t length) {
  mark(start, length, 1);
  num_free_ += length;
  if (start > 0 && free_flag_[start - 1]) {  // merge with the run on the left
    BlockId left = run_start_[start - 1];
    unlink_run(left);
    length += start - left;
    start = left;
  }
  BlockId after = start + length;
  if (after < num_blocks_ && free_flag_[after]) {  // merge with the run on the right
    unlink_run(after);
    length += run_length_[after];
  }
  link_run(start, length);
}

void FreePool::give(const BlockId* blocks, size_t count) {
  if (placement_ != Placement::kContiguous) {
    for (size_t i = 0; i < count; ++i) {
      ring_[(ring_head_ + static_cast<size_t>(num_free_)) % ring_.size()] = blocks[i];
      free_flag_[blocks[i]] = 1;
      ++num_free_;
    }
    return;
  }
  size_t i = 0;
  while (i < count) {
    size_t j = i + 1;
    while (j < count && blocks[j] == blocks[j - 1] + 1) ++j;
    give_run(blocks[i], static_cast<int32_t>(j - i));
    i = j;
  }
}

void FreePool::take_from_run(BlockId run, int32_t offset, int32_t count, std::vector<BlockId>& out) {
  int32_t length = run_length_[run];
  unlink_run(run);
  if (offset > 0) link_run(run, offset);
  int32_t tail = length - offset - count;
  if (tail > 0) link_run(run + offset + count, tail);
  BlockId first = run + offset;
  mark(first, count, 0);
  num_free_ -= count;
  for (int32_t k = 0; k < count; ++k) out.push_back(first + k);
}

int32_t FreePool::take_following(BlockId last, int32_t max_count, std::vector<BlockId>& out) {
  BlockId next = last + 1;
  if (placement_ != Placement::kContiguous || max_count <= 0 || next >= num_blocks_ || !free_flag_[next]) return 0;
  // `last` is in use, so a free `next` is necessarily the first block of its run.
  int32_t count = run_length_[next] < max_count ? run_length_[next] : max_count;
  take_from_run(next, 0, count, out);
  return count;
}

BlockId FreePool::largest_run() const {
  int bin = 31 - __builtin_clz(nonempty_bins_);
  BlockId best = bin_head_[bin];
  BlockId candidate = bin_next_[best];
  for (int k = 1; k < kLargestRunScan && candidate != kNone; ++k, candidate = bin_next_[candidate]) {
    if (run_length_[candidate] > run_length_[best]) best = candidate;
  }
  return best;
}

void FreePool::take(int32_t count, std::vector<BlockId>& out) {
  KVSCHED_ASSERT(count <= num_free_, "take(", count, ") with ", num_free_, " free");
  if (placement_ != Placement::kContiguous) {
    for (int32_t k = 0; k < count; ++k) {
      size_t slot;
      if (placement_ == Placement::kFifo) {
        slot = ring_head_;
        ring_head_ = (ring_head_ + 1) % ring_.size();
      } else {
        slot = (ring_head_ + static_cast<size_t>(num_free_) - 1) % ring_.size();
      }
      BlockId block = ring_[slot];
      free_flag_[block] = 0;
      --num_free_;
      out.push_back(block);
    }
    return;
  }
  while (count > 0) {
    BlockId run = largest_run();
    int32_t length = run_length_[run];
    if (length <= count) {
      take_from_run(run, 0, length, out);
      count -= length;
      continue;
    }
    // The block before a run (if any) is in use and often the tail of a growing sequence: leave it
    // half of the spare room to grow into, and keep the other half after the new blocks for their
    // own growth. Measured on Azure conv replays (bench/README.md) against front placement and
    // best fit: the even split keeps extents 2-10x longer unless the pool is thrashing.
    int32_t offset = run > 0 ? (length - count) / 2 : 0;
    take_from_run(run, offset, count, out);
    count = 0;
  }
}

void FreePool::check_invariants() const {
  int32_t counted = 0;
  for (int32_t b = 0; b < num_blocks_; ++b) counted += free_flag_[b];
  KVSCHED_ASSERT(counted == num_free_, "free flags count ", counted, " but num_free is ", num_free_);
  if (placement_ != Placement::kContiguous) return;
  int32_t in_runs = 0;
  uint32_t seen_bins = 0;
  for (int bin = 0; bin < 32; ++bin) {
    for (BlockId run = bin_head_[bin]; run != kNone; run = bin_next_[run]) {
      int32_t length = run_length_[run];
      KVSCHED_ASSERT(length > 0 && bin_of(length) == bin, "run at ", run, " of length ", length, " in bin ", bin);
      KVSCHED_ASSERT(run_start_[run + length - 1] == run, "end tag of run at ", run);
      KVSCHED_ASSERT(run == 0 || !free_flag_[run - 1], "run at ", run, " has a free left neighbour");
      KVSCHED_ASSERT(run + length == num_blocks_ || !free_flag_[run + length], "run at ", run,
                     " has a free right neighbour");
      for (int32_t k = 0; k < length; ++k) KVSCHED_ASSERT(free_flag_[run + k], "block ", run + k, " in a run is not free");
      in_runs += length;
      seen_bins |= 1u << bin;
    }
  }
  KVSCHED_ASSERT(in_runs == num_free_, "runs hold ", in_runs, " blocks but num_free is ", num_free_);
  KVSCHED_ASSERT(seen_bins == nonempty_bins_, "non-empty bin mask is stale");
}

}  // namespace kvsched
