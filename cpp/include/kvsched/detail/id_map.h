// Flat hash map from non-negative int64 ids to records, for tables looked up every step.
//
// Glossary
//   slot    a record in `records_` (a deque: addresses stay valid as it grows). Released slots go
//           on a free stack and are reused with their heap buffers intact (a recycled block table
//           keeps its capacity), so steady-state insert/erase does not allocate.
//   bucket  an entry of the open-addressing index: kEmpty, kTombstone, or (id, slot). Linear
//           probing, load (live + tombstones) kept under 1/2; a rebuild drops the tombstones.
// Not thread-safe; the owner serializes access.
#pragma once

#include <cstdint>
#include <deque>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kvsched::detail {

template <typename Record>
class IdMap {
 public:
  IdMap() { rebuild(16); }

  size_t size() const { return size_; }

  Record* find(int64_t id) {
    if (id < 0) return nullptr;  // negative keys mark empty buckets: they never name a record
    size_t bucket = locate(id);
    return keys_[bucket] == id ? &records_[slots_[bucket]] : nullptr;
  }
  const Record* find(int64_t id) const { return const_cast<IdMap*>(this)->find(id); }

  // Returns the record for `id` and whether it was created (a reset record).
  std::pair<Record*, bool> try_emplace(int64_t id) {
    if (id < 0) throw std::invalid_argument("IdMap: ids must be >= 0, got " + std::to_string(id));
    size_t bucket = locate(id);
    if (keys_[bucket] == id) return {&records_[slots_[bucket]], false};
    if ((size_ + tombstones_ + 1) * 2 > keys_.size()) rebuild(size_ * 4 > keys_.size() ? keys_.size() * 2 : keys_.size());
    // Reuse the first tombstone on the probe path if there is one.
    size_t insert_at = first_free_on_path(id);
    if (keys_[insert_at] == kTombstone) --tombstones_;
    int32_t slot;
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
      free_slots_.pop_back();
    } else {
      slot = static_cast<int32_t>(records_.size());
      records_.emplace_back();
    }
    keys_[insert_at] = id;
    slots_[insert_at] = slot;
    ++size_;
    return {&records_[slot], true};
  }

  // Removes `id` (which must be present); `reset` returns its record to the default state while
  // keeping reusable buffers.
  template <typename Reset>
  void erase(int64_t id, Reset&& reset) {
    if (id < 0) return;
    size_t bucket = locate(id);
    if (keys_[bucket] != id) return;  // not there: nothing to erase
    int32_t slot = slots_[bucket];
    reset(records_[slot]);
    free_slots_.push_back(slot);
    keys_[bucket] = kTombstone;
    ++tombstones_;
    --size_;
  }

  template <typename Visit>
  void for_each(Visit&& visit) const {
    for (size_t b = 0; b < keys_.size(); ++b) {
      if (keys_[b] >= 0) visit(keys_[b], records_[slots_[b]]);
    }
  }

 private:
  static constexpr int64_t kEmpty = -1;
  static constexpr int64_t kTombstone = -2;

  static uint64_t mix(int64_t id) {
    uint64_t x = static_cast<uint64_t>(id) * 0x9e3779b97f4a7c15ULL;
    return x ^ (x >> 32);
  }

  // The bucket holding `id`, or the empty bucket ending its probe path.
  size_t locate(int64_t id) const {
    size_t mask = keys_.size() - 1;
    for (size_t b = mix(id) & mask;; b = (b + 1) & mask) {
      if (keys_[b] == id || keys_[b] == kEmpty) return b;
    }
  }

  size_t first_free_on_path(int64_t id) const {
    size_t mask = keys_.size() - 1;
    for (size_t b = mix(id) & mask;; b = (b + 1) & mask) {
      if (keys_[b] < 0) return b;
    }
  }

  void rebuild(size_t capacity) {
    std::vector<int64_t> old_keys = std::move(keys_);
    std::vector<int32_t> old_slots = std::move(slots_);
    keys_.assign(capacity, kEmpty);
    slots_.assign(capacity, -1);
    tombstones_ = 0;
    size_t mask = capacity - 1;
    for (size_t b = 0; b < old_keys.size(); ++b) {
      if (old_keys[b] < 0) continue;
      size_t at = mix(old_keys[b]) & mask;
      while (keys_[at] != kEmpty) at = (at + 1) & mask;
      keys_[at] = old_keys[b];
      slots_[at] = old_slots[b];
    }
  }

  std::vector<int64_t> keys_;
  std::vector<int32_t> slots_;
  std::deque<Record> records_;
  std::vector<int32_t> free_slots_;
  size_t size_ = 0;
  size_t tombstones_ = 0;
};

}  // namespace kvsched::detail
