#include "kvsched/output_length_history.h"

#include <algorithm>
#include <cmath>

#include "kvsched/errors.h"
#include "kvsched/limits.h"

namespace kvsched {
namespace {

// Index of the first element > value in a sorted array; branch-free so that a batch of
// predictions does not pay a misprediction per halving.
size_t first_greater(const std::vector<int64_t>& sorted, int64_t value) {
  if (sorted.empty()) return 0;
  const int64_t* base = sorted.data();
  size_t n = sorted.size();
  while (n > 1) {
    size_t half = n / 2;
    base = base[half - 1] <= value ? base + half : base;
    n -= half;
  }
  return static_cast<size_t>(base - sorted.data()) + (*base <= value ? 1 : 0);
}

}  // namespace

OutputLengthHistory::OutputLengthHistory(int32_t capacity, const std::vector<int64_t>& prior)
    : capacity_(static_cast<size_t>(capacity)) {
  KVSCHED_EXPECTS(capacity > 0 && capacity <= kMaxWindow, std::invalid_argument, "window must be in [1, ", kMaxWindow,
                  "], got ", capacity);
  // No reservation: memory follows the lengths recorded, not the window (many classes, few each).
  for (int64_t length : prior) record(length);
}

void OutputLengthHistory::record(int64_t length) {
  table_.clear();  // the window changes: the quantile table is rebuilt on next use
  if (ring_.size() == capacity_) {
    int64_t evicted = ring_[oldest_];
    sorted_.erase(std::lower_bound(sorted_.begin(), sorted_.end(), evicted));
    ring_[oldest_] = length;
    oldest_ = (oldest_ + 1) % capacity_;
  } else {
    ring_.push_back(length);
  }
  sorted_.insert(std::upper_bound(sorted_.begin(), sorted_.end(), length), length);
}

size_t OutputLengthHistory::count_longer(int64_t generated) const {
  return sorted_.size() - first_greater(sorted_, generated);
}

int64_t OutputLengthHistory::conditional_select(int64_t generated, size_t k) const {
  size_t first = first_greater(sorted_, generated);
  return sorted_[first + k];
}

int64_t OutputLengthHistory::conditional_quantile(int64_t generated, double q) const {
  int64_t total;
  conditional_quantiles(&generated, 1, q, &total);
  return total;
}

void OutputLengthHistory::conditional_quantiles(const int64_t* generated, size_t count, double q, int64_t* totals) const {
  if (sorted_.empty()) {
    std::fill(totals, totals + count, -1);
    return;
  }
  if (q != table_quantile_ || table_.size() != sorted_.size()) {
    // The answer depends on `generated` only through its rank, so tabulate it per rank once for
    // this window and quantile: one batch of predictions then costs a search and a load each.
    table_.resize(sorted_.size());
    for (size_t rank = 0; rank < sorted_.size(); ++rank) {
      size_t longer = sorted_.size() - rank;
      double position = std::ceil(q * static_cast<double>(longer));
      size_t k = position < 1.0 ? 0 : std::min(longer - 1, static_cast<size_t>(position) - 1);
      table_[rank] = sorted_[rank + k];
    }
    table_quantile_ = q;
  }
  // Binary searches in lockstep, kLanes at a time: their loads are independent, so the CPU
  // overlaps them instead of waiting on one chain of dependent loads per request.
  constexpr size_t kLanes = 8;
  const int64_t* data = sorted_.data();
  for (size_t start = 0; start < count; start += kLanes) {
    size_t lanes = std::min(kLanes, count - start);
    size_t base[kLanes] = {0};
    for (size_t n = sorted_.size(); n > 1;) {
      size_t half = n / 2;
      for (size_t l = 0; l < lanes; ++l) base[l] = data[base[l] + half - 1] <= generated[start + l] ? base[l] + half : base[l];
      n -= half;
    }
    for (size_t l = 0; l < lanes; ++l) {
      size_t first = base[l] + (data[base[l]] <= generated[start + l] ? 1 : 0);
      totals[start + l] = first == sorted_.size() ? -1 : table_[first];
    }
  }
}

}  // namespace kvsched
