#include "kvsched/output_length_history.h"

#include <algorithm>
#include <cmath>

#include "kvsched/errors.h"

namespace kvsched {

OutputLengthHistory::OutputLengthHistory(int32_t capacity, const std::vector<int64_t>& prior)
    : capacity_(static_cast<size_t>(capacity)) {
  KVSCHED_EXPECTS(capacity > 0, std::invalid_argument, "window must be > 0, got ", capacity);
  ring_.reserve(capacity_);
  sorted_.reserve(capacity_);
  for (int64_t length : prior) record(length);
}

void OutputLengthHistory::record(int64_t length) {
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
  return static_cast<size_t>(sorted_.end() - std::upper_bound(sorted_.begin(), sorted_.end(), generated));
}

int64_t OutputLengthHistory::conditional_select(int64_t generated, size_t k) const {
  size_t first = static_cast<size_t>(std::upper_bound(sorted_.begin(), sorted_.end(), generated) - sorted_.begin());
  return sorted_[first + k];
}

int64_t OutputLengthHistory::conditional_quantile(int64_t generated, double q) const {
  size_t first = static_cast<size_t>(std::upper_bound(sorted_.begin(), sorted_.end(), generated) - sorted_.begin());
  size_t count = sorted_.size() - first;
  if (count == 0) return -1;
  double position = std::ceil(q * static_cast<double>(count));
  size_t k = position < 1.0 ? 0 : std::min(count - 1, static_cast<size_t>(position) - 1);
  return sorted_[first + k];
}

}  // namespace kvsched
