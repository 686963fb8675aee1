#include "kvsched/peak_estimator.h"

#include <algorithm>
#include <cmath>

#include "kvsched/errors.h"

namespace kvsched {
namespace {

constexpr int32_t kMaxEstimatorBlockSize = 1 << 16;

double logit(double p) { return std::log(p / (1.0 - p)); }
double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Walks requests in descending `remaining` order and keeps the occupancy at each completion.
class PeakScan {
 public:
  explicit PeakScan(int32_t block_size) : block_size_(block_size) {
    if (block_size_ > 0) remainder_counts_.assign(static_cast<size_t>(block_size_) + 1, 0);
  }

  void add(int64_t held, int64_t remaining) {
    ++count_;
    if (block_size_ <= 0) {
      held_sum_ += held;
      peak_ = std::max(peak_, count_ * remaining + held_sum_);
      return;
    }
    // ceil((a + b) / B) = qa + qb + [ra + rb > 0] + [ra + rb > B], a = qa*B + ra, b = qb*B + rb.
    int64_t bs = block_size_;
    held_blocks_ += held / bs;
    int64_t held_rest = held % bs;
    if (held_rest > 0) ++nonzero_rests_;
    fenwick_add(held_rest);
    int64_t qb = remaining / bs, rb = remaining % bs;
    int64_t occupancy = held_blocks_ + count_ * qb;
    if (rb > 0) occupancy += count_ + (count_ - fenwick_count_upto(bs - rb));
    else occupancy += nonzero_rests_;
    peak_ = std::max(peak_, occupancy);
  }

  int64_t peak() const { return peak_; }

 private:
  // Fenwick tree over held % block_size, 1-based internally.
  void fenwick_add(int64_t rest) {
    for (size_t i = static_cast<size_t>(rest) + 1; i < remainder_counts_.size(); i += i & (~i + 1)) ++remainder_counts_[i];
  }
  int64_t fenwick_count_upto(int64_t rest) const {  // how many held % B <= rest
    int64_t total = 0;
    for (size_t i = static_cast<size_t>(rest) + 1; i > 0; i -= i & (~i + 1)) total += remainder_counts_[i];
    return total;
  }

  int32_t block_size_;
  int64_t count_ = 0, held_sum_ = 0, held_blocks_ = 0, nonzero_rests_ = 0, peak_ = 0;
  std::vector<int64_t> remainder_counts_;
};

}  // namespace

int64_t future_peak(const int64_t* held, const int64_t* remaining, size_t count, int32_t block_size) {
  std::vector<size_t> order(count);
  for (size_t i = 0; i < count; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return remaining[x] > remaining[y]; });
  PeakScan scan(block_size);
  for (size_t i : order) scan.add(held[i], remaining[i]);
  return scan.peak();
}

PeakEstimator::PeakEstimator(PeakEstimatorOptions options)
    : options_(std::move(options)), all_classes_(options_.window, options_.prior), rng_(options_.seed) {
  const PeakEstimatorOptions& o = options_;
  KVSCHED_EXPECTS(o.block_size >= 0 && o.block_size <= kMaxEstimatorBlockSize, std::invalid_argument,
                  "block_size must be in [0, ", kMaxEstimatorBlockSize, "], got ", o.block_size);
  KVSCHED_EXPECTS(o.min_quantile > 0.0 && o.min_quantile <= o.max_quantile && o.max_quantile < 1.0,
                  std::invalid_argument, "quantile bounds must satisfy 0 < min_quantile <= max_quantile < 1, got ",
                  o.min_quantile, " and ", o.max_quantile);
  KVSCHED_EXPECTS(o.quantile >= o.min_quantile && o.quantile <= o.max_quantile, std::invalid_argument,
                  "quantile must be in [min_quantile, max_quantile] = [", o.min_quantile, ", ", o.max_quantile,
                  "], got ", o.quantile);
  KVSCHED_EXPECTS(o.target_preemption_rate >= 0.0 && o.target_preemption_rate < 1.0, std::invalid_argument,
                  "target_preemption_rate must be in [0, 1), got ", o.target_preemption_rate);
  KVSCHED_EXPECTS(o.adapt_gain >= 0.0 && std::isfinite(o.adapt_gain), std::invalid_argument,
                  "adapt_gain must be finite and >= 0, got ", o.adapt_gain);
  KVSCHED_EXPECTS(o.num_scenarios >= 1, std::invalid_argument, "num_scenarios must be >= 1, got ", o.num_scenarios);
  for (int64_t length : o.prior) {
    KVSCHED_EXPECTS(length >= 0, std::invalid_argument, "prior lengths must be >= 0, got ", length);
  }
  quantile_logit_ = logit(o.quantile);
}

double PeakEstimator::quantile() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return sigmoid(quantile_logit_);
}

size_t PeakEstimator::history_size(int32_t class_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (class_id == -1) return all_classes_.size();
  auto it = by_class_.find(class_id);
  return it == by_class_.end() ? 0 : it->second.size();
}

void PeakEstimator::record(const int64_t* lengths, const int32_t* class_ids, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < count; ++i) {
    KVSCHED_EXPECTS(lengths[i] >= 0, std::invalid_argument, "lengths[", i, "] must be >= 0, got ", lengths[i]);
    KVSCHED_EXPECTS(!class_ids || class_ids[i] >= 0, std::invalid_argument, "class_ids[", i, "] must be >= 0, got ",
                    class_ids[i]);
  }
  for (size_t i = 0; i < count; ++i) {
    int32_t class_id = class_ids ? class_ids[i] : 0;
    auto it = by_class_.find(class_id);
    if (it == by_class_.end()) it = by_class_.emplace(class_id, OutputLengthHistory(options_.window, options_.prior)).first;
    it->second.record(lengths[i]);
    all_classes_.record(lengths[i]);
  }
}

void PeakEstimator::observe(int64_t preempted, int64_t admitted) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(preempted >= 0, std::invalid_argument, "preempted must be >= 0, got ", preempted);
  KVSCHED_EXPECTS(admitted >= 0, std::invalid_argument, "admitted must be >= 0, got ", admitted);
  if (!options_.adaptive) return;
  // Stochastic approximation in logit space: at equilibrium preempted = target * admitted.
  quantile_logit_ += options_.adapt_gain * (static_cast<double>(preempted) -
                                            options_.target_preemption_rate * static_cast<double>(admitted));
  quantile_logit_ = std::clamp(quantile_logit_, logit(options_.min_quantile), logit(options_.max_quantile));
}

const OutputLengthHistory* PeakEstimator::history_for(int32_t class_id) const {
  auto it = by_class_.find(class_id);
  // A class with no history of its own borrows the pooled one.
  if (it != by_class_.end() && it->second.size() > 0) return &it->second;
  return all_classes_.size() > 0 ? &all_classes_ : nullptr;
}

void PeakEstimator::check_requests(AdmissionMode mode, const RequestArrays& r, const char* prefix,
                                   const char* held_name) const {
  int mode_value = static_cast<int>(mode);
  KVSCHED_EXPECTS(mode_value >= 0 && mode_value <= 4, std::invalid_argument, "mode must be in [0, 4], got ",
                  mode_value);
  for (size_t i = 0; i < r.count; ++i) {
    KVSCHED_EXPECTS(r.held[i] >= 0, std::invalid_argument, prefix, held_name, "[", i, "] must be >= 0, got ",
                    r.held[i]);
    KVSCHED_EXPECTS(!r.generated || r.generated[i] >= 0, std::invalid_argument, prefix, "generated[", i,
                    "] must be >= 0, got ", r.generated[i]);
    KVSCHED_EXPECTS(r.max_new_tokens[i] >= 0, std::invalid_argument, prefix, "max_new_tokens[", i,
                    "] must be >= 0, got ", r.max_new_tokens[i]);
    KVSCHED_EXPECTS(!r.class_ids || r.class_ids[i] >= 0, std::invalid_argument, prefix, "class_ids[", i,
                    "] must be >= 0, got ", r.class_ids[i]);
    KVSCHED_EXPECTS(!r.known_lengths || r.known_lengths[i] >= 0, std::invalid_argument, prefix, "lengths[", i,
                    "] must be >= 0, got ", r.known_lengths[i]);
  }
  bool needs_known = mode == AdmissionMode::kOracle || mode == AdmissionMode::kPredicted;
  KVSCHED_EXPECTS(!needs_known || r.count == 0 || r.known_lengths, std::invalid_argument, prefix,
                  "lengths is required by the oracle and predicted modes");
}

void PeakEstimator::predict_locked(AdmissionMode mode, const RequestArrays& r, int64_t* out) {
  double q = sigmoid(quantile_logit_);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (size_t i = 0; i < r.count; ++i) {
    int64_t generated = r.generated ? r.generated[i] : 0;
    int64_t budget = std::max<int64_t>(0, r.max_new_tokens[i] - generated);
    int64_t remaining = budget;
    switch (mode) {
      case AdmissionMode::kAggressive:
        remaining = 0;
        break;
      case AdmissionMode::kConservative:
        break;
      case AdmissionMode::kPastFuture: {
        const OutputLengthHistory* history = history_for(r.class_ids ? r.class_ids[i] : 0);
        if (!history) break;  // no history yet: reserve max_new_tokens
        int64_t total = -1;
        if (options_.sampling) {
          size_t longer = history->count_longer(generated);
          if (longer > 0) {
            size_t k = std::min(longer - 1, static_cast<size_t>(uniform(rng_) * static_cast<double>(longer)));
            total = history->conditional_select(generated, k);
          }
        } else {
          total = history->conditional_quantile(generated, q);
        }
        // No finished request ran this long: fall back to max_new_tokens.
        if (total >= 0) remaining = std::min(budget, total - generated);
        break;
      }
      case AdmissionMode::kOracle:
        remaining = std::min(budget, std::max<int64_t>(0, r.known_lengths[i] - generated));
        break;
      case AdmissionMode::kPredicted:
        if (r.known_lengths[i] > generated) remaining = std::min(budget, r.known_lengths[i] - generated);
        break;
    }
    out[i] = remaining;
  }
}

void PeakEstimator::predict_remaining(AdmissionMode mode, const RequestArrays& requests, int64_t* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_requests(mode, requests, "", "generated");
  predict_locked(mode, requests, out);
}

int64_t PeakEstimator::peak_with_prefix(const std::vector<Item>& running, const std::vector<Item>& candidates,
                                        size_t prefix, std::vector<Item>& scratch) const {
  scratch.assign(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(prefix));
  std::sort(scratch.begin(), scratch.end(), [](const Item& x, const Item& y) { return x.remaining > y.remaining; });
  PeakScan scan(options_.block_size);
  size_t i = 0, j = 0;
  while (i < running.size() || j < scratch.size()) {
    bool take_running = j == scratch.size() || (i < running.size() && running[i].remaining >= scratch[j].remaining);
    const Item& item = take_running ? running[i++] : scratch[j++];
    scan.add(item.held, item.remaining);
  }
  return scan.peak();
}

int64_t PeakEstimator::admit(AdmissionMode mode, const RequestArrays& running, const RequestArrays& candidates,
                             int64_t capacity, int64_t reserve) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(capacity > 0, std::invalid_argument, "capacity must be > 0, got ", capacity);
  KVSCHED_EXPECTS(reserve >= 0 && reserve <= capacity, std::invalid_argument, "reserve must be in [0, capacity], got ",
                  reserve);
  check_requests(mode, running, "running_", "held");
  check_requests(mode, candidates, "candidate_", "prompt");
  int64_t budget = capacity - reserve;
  int scenarios = options_.sampling && mode == AdmissionMode::kPastFuture ? options_.num_scenarios : 1;
  int64_t admitted = static_cast<int64_t>(candidates.count);
  for (int s = 0; s < scenarios && admitted > 0; ++s) {
    scratch_remaining_.resize(std::max(running.count, candidates.count));
    predict_locked(mode, running, scratch_remaining_.data());
    running_items_.resize(running.count);
    for (size_t i = 0; i < running.count; ++i) running_items_[i] = Item{scratch_remaining_[i], running.held[i]};
    std::sort(running_items_.begin(), running_items_.end(),
              [](const Item& x, const Item& y) { return x.remaining > y.remaining; });
    predict_locked(mode, candidates, scratch_remaining_.data());
    candidate_items_.resize(candidates.count);
    for (size_t i = 0; i < candidates.count; ++i) candidate_items_[i] = Item{scratch_remaining_[i], candidates.held[i]};
    // The peak grows with every candidate added, so the admissible candidates form a prefix.
    if (peak_with_prefix(running_items_, candidate_items_, 0, merge_scratch_) > budget) return 0;
    int64_t low = 0, high = admitted;  // peak(low) fits; find the largest fitting prefix <= high
    while (low < high) {
      int64_t middle = low + (high - low + 1) / 2;
      if (peak_with_prefix(running_items_, candidate_items_, static_cast<size_t>(middle), merge_scratch_) <= budget) {
        low = middle;
      } else {
        high = middle - 1;
      }
    }
    admitted = low;
  }
  return admitted;
}

}  // namespace kvsched
