// Sliding window of recently finished output lengths, answering conditional quantiles.
//
// Glossary
//   window   the last `capacity` recorded lengths, oldest first (a ring buffer). A prior, if given,
//            fills the window first, so real lengths push it out as they arrive.
//   sorted   the same lengths kept sorted: a rank is a binary search (O(log W)); an update moves
//            at most W ints (one memmove), never a re-sort.
//   L | L > g  the lengths longer than g tokens (g = tokens already generated): a request that has
//            generated g tokens is one of those. Its predicted total is a quantile of them.
// Not thread-safe (even const calls fill a cache); the owning PeakEstimator serializes access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvsched {

class OutputLengthHistory {
 public:
  explicit OutputLengthHistory(int32_t capacity, const std::vector<int64_t>& prior = {});

  void record(int64_t length);
  size_t size() const { return sorted_.size(); }
  const std::vector<int64_t>& sorted() const { return sorted_; }

  // Number of lengths > generated.
  size_t count_longer(int64_t generated) const;
  // The q-quantile (inverted CDF: the smallest x with P(L <= x | L > g) >= q) of the lengths
  // longer than `generated`; -1 when there are none.
  int64_t conditional_quantile(int64_t generated, double q) const;
  // conditional_quantile for a batch of requests (faster than one at a time).
  void conditional_quantiles(const int64_t* generated, size_t count, double q, int64_t* totals) const;
  // The k-th smallest (0-based) of the lengths longer than `generated`; k < count_longer(generated).
  int64_t conditional_select(int64_t generated, size_t k) const;

 private:
  size_t capacity_;
  std::vector<int64_t> ring_;
  size_t oldest_ = 0;
  std::vector<int64_t> sorted_;
  // conditional_quantile's answers by rank for `table_quantile_`; empty when stale.
  mutable std::vector<int64_t> table_;
  mutable double table_quantile_ = -1.0;
};

}  // namespace kvsched
