#include "kvsched/peak_estimator.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "kvsched/detail/mix64.h"
#include "kvsched/errors.h"

namespace kvsched {
namespace {

constexpr int32_t kMaxEstimatorBlockSize = 1 << 16;
constexpr int64_t kDenseHistogramLimit = 64;
// Running positions per segment of the profile: a scan skips a segment whose maxima fit.
constexpr size_t kProfileSegment = 32;

// Index of the first negative value, or count if none. The common all-valid case is one OR of
// the sign bits (vectorized, no branch per element): validation runs over every request at
// every step.
template <typename T>
size_t first_negative(const T* values, size_t count) {
  T sign_bits = 0;
  for (size_t i = 0; i < count; ++i) sign_bits |= values[i];
  if (sign_bits >= 0) return count;
  return static_cast<size_t>(std::find_if(values, values + count, [](T v) { return v < 0; }) - values);
}

// A uniform draw in [0, 1) that is a function of (seed, key, scenario).
double keyed_uniform(uint64_t seed, int64_t key, int scenario) {
  uint64_t z = seed ^ (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) ^ (static_cast<uint64_t>(scenario) << 56);
  return static_cast<double>(detail::mix64(z + 0x9E3779B97F4A7C15ull) >> 11) * 0x1.0p-53;
}

double logit(double p) { return std::log(p / (1.0 - p)); }
double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Walks requests in descending `remaining` order and keeps the occupancy at each completion.
class PeakScan {
 public:
  // `counts` is scratch space for the block count (reused across scans to avoid allocating).
  PeakScan(int32_t block_size, std::vector<int64_t>& counts) : block_size_(block_size), remainder_counts_(counts) {
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
  std::vector<int64_t>& remainder_counts_;
};

void sort_by_remaining_descending(std::vector<detail::PeakItem>& items, std::vector<detail::PeakItem>& buffer) {
  // LSD radix sort on the complemented key, only over the bits in use, split evenly into passes
  // of at most 11 bits: linear where a comparison sort of a thousand running requests costs
  // several microseconds, and with buckets few enough (64 for 12 bits) that clearing and summing
  // them does not outweigh the items.
  int64_t largest = 0;
  for (const detail::PeakItem& item : items) largest = std::max(largest, item.remaining);
  if (largest == 0 || items.size() < 2) return;
  const int bits_in_use = 64 - __builtin_clzll(static_cast<unsigned long long>(largest));
  constexpr int kMaxBits = 11;
  const int passes = (bits_in_use + kMaxBits - 1) / kMaxBits;
  const int bits = (bits_in_use + passes - 1) / passes;
  const size_t buckets = size_t{1} << bits;
  size_t counts[(size_t{1} << kMaxBits) + 1];
  buffer.resize(items.size());
  for (int shift = 0; shift < bits_in_use; shift += bits) {
    std::fill(counts, counts + buckets + 1, size_t{0});
    auto digit = [&](const detail::PeakItem& item) {
      return static_cast<size_t>(((largest - item.remaining) >> shift) & static_cast<int64_t>(buckets - 1));
    };
    for (const detail::PeakItem& item : items) ++counts[digit(item) + 1];
    for (size_t b = 1; b <= buckets; ++b) counts[b] += counts[b - 1];
    for (const detail::PeakItem& item : items) buffer[counts[digit(item)]++] = item;
    items.swap(buffer);
  }
}

}  // namespace

int64_t future_peak(const int64_t* held, const int64_t* remaining, size_t count, int32_t block_size) {
  // The peak is at most every token held plus count times the longest remainder: refuse what
  // would not fit in int64 rather than wrap.
  Int128 held_total = 0;
  int64_t longest = 0;
  for (size_t i = 0; i < count; ++i) {
    KVSCHED_EXPECTS(held[i] >= 0 && remaining[i] >= 0, std::invalid_argument, "held[", i, "] and remaining[", i,
                    "] must be >= 0, got ", held[i], " and ", remaining[i]);
    held_total += held[i];
    longest = std::max(longest, remaining[i]);
  }
  KVSCHED_EXPECTS(held_total + static_cast<Int128>(count) * longest <= INT64_MAX, std::overflow_error,
                  "future_peak: held and remaining are too large: the peak of these ", count,
                  " requests could exceed int64");
  std::vector<detail::PeakItem> items(count), buffer;
  for (size_t i = 0; i < count; ++i) items[i] = detail::PeakItem{remaining[i], held[i]};
  sort_by_remaining_descending(items, buffer);
  std::vector<int64_t> counts;
  PeakScan scan(block_size, counts);
  for (const detail::PeakItem& item : items) scan.add(item.held, item.remaining);
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
  KVSCHED_EXPECTS(o.num_scenarios >= 1 && o.num_scenarios <= kMaxScenarios, std::invalid_argument,
                  "num_scenarios must be in [1, ", kMaxScenarios, "], got ", o.num_scenarios);
  KVSCHED_EXPECTS(o.overflow_scenarios >= 0 && o.overflow_scenarios < o.num_scenarios, std::invalid_argument,
                  "overflow_scenarios must be in [0, num_scenarios) = [0, ", o.num_scenarios, "), got ",
                  o.overflow_scenarios);
  KVSCHED_EXPECTS(o.window >= 1 && o.window <= kMaxWindow, std::invalid_argument, "window must be in [1, ", kMaxWindow,
                  "], got ", o.window);
  KVSCHED_EXPECTS(o.prior.size() <= static_cast<size_t>(kMaxWindow), std::invalid_argument, "prior has ",
                  o.prior.size(), " lengths, at most ", kMaxWindow);
  for (int64_t length : o.prior) {
    KVSCHED_EXPECTS(length >= 0 && length <= kMaxRequestTokens, std::invalid_argument, "prior lengths must be in [0, ",
                    kMaxRequestTokens, "], got ", length);
  }
  quantile_logit_ = logit(o.quantile);
  if (o.block_size > 0 && (o.block_size & (o.block_size - 1)) == 0) block_shift_ = __builtin_ctz(static_cast<unsigned>(o.block_size));
}

double PeakEstimator::quantile() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return sigmoid(quantile_logit_);
}

size_t PeakEstimator::history_size(int32_t class_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (class_id == -1) return all_classes_.size();
  auto it = by_class_.find(class_id);
  return it == by_class_.end() ? 0 : it->second.lengths.size();
}

void PeakEstimator::record(const int64_t* lengths, const int32_t* class_ids, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < count; ++i) {
    KVSCHED_EXPECTS(lengths[i] >= 0 && lengths[i] <= kMaxRequestTokens, std::invalid_argument, "lengths[", i,
                    "] must be in [0, ", kMaxRequestTokens, "], got ", lengths[i]);
    KVSCHED_EXPECTS(!class_ids || class_ids[i] >= 0, std::invalid_argument, "class_ids[", i, "] must be >= 0, got ",
                    class_ids[i]);
  }
  for (size_t i = 0; i < count; ++i) {
    int32_t class_id = class_ids ? class_ids[i] : 0;
    auto it = by_class_.find(class_id);
    if (it == by_class_.end()) {
      if (by_class_.size() >= kMaxClassHistories) {  // forget the class that finished least recently
        auto oldest = std::min_element(by_class_.begin(), by_class_.end(), [](const auto& a, const auto& b) {
          return a.second.last_record < b.second.last_record;
        });
        by_class_.erase(oldest);
      }
      it = by_class_.emplace(class_id, ClassHistory{OutputLengthHistory(options_.window, options_.prior), 0}).first;
    }
    it->second.lengths.record(lengths[i]);
    it->second.last_record = ++record_clock_;
    all_classes_.record(lengths[i]);
  }
}

void PeakEstimator::set_overflow_scenarios(int32_t overflow_scenarios) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(overflow_scenarios >= 0 && overflow_scenarios < options_.num_scenarios, std::invalid_argument,
                  "overflow_scenarios must be in [0, num_scenarios) = [0, ", options_.num_scenarios, "), got ",
                  overflow_scenarios);
  options_.overflow_scenarios = overflow_scenarios;
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
  if (it != by_class_.end() && it->second.lengths.size() > 0) return &it->second.lengths;
  return all_classes_.size() > 0 ? &all_classes_ : nullptr;
}

void PeakEstimator::check_requests(AdmissionMode mode, const RequestArrays& r, const char* prefix,
                                   const char* held_name) const {
  int mode_value = static_cast<int>(mode);
  KVSCHED_EXPECTS(mode_value >= 0 && mode_value <= 4, std::invalid_argument, "mode must be in [0, 4], got ",
                  mode_value);
  auto check_non_negative = [&](const auto* values, const char* name) {
    size_t i = first_negative(values, r.count);
    KVSCHED_EXPECTS(i == r.count, std::invalid_argument, prefix, name, "[", i, "] must be >= 0, got ",
                    static_cast<int64_t>(values[i]));
  };
  check_non_negative(r.held, held_name);
  if (r.generated) check_non_negative(r.generated, "generated");
  check_non_negative(r.max_new_tokens, "max_new_tokens");
  if (r.class_ids) check_non_negative(r.class_ids, "class_ids");
  if (r.known_lengths) check_non_negative(r.known_lengths, "lengths");
  bool needs_known = mode == AdmissionMode::kOracle || mode == AdmissionMode::kPredicted;
  KVSCHED_EXPECTS(!needs_known || r.count == 0 || r.known_lengths, std::invalid_argument, prefix,
                  "lengths is required by the oracle and predicted modes");
}

void PeakEstimator::predict_locked(AdmissionMode mode, const RequestArrays& r, int64_t* out, int scenario) {
  // Start from the cap every mode respects: max_new_tokens - generated.
  for (size_t i = 0; i < r.count; ++i) {
    out[i] = std::max<int64_t>(0, r.max_new_tokens[i] - (r.generated ? r.generated[i] : 0));
  }
  switch (mode) {
    case AdmissionMode::kConservative:
      return;
    case AdmissionMode::kAggressive:
      std::fill(out, out + r.count, 0);
      return;
    case AdmissionMode::kOracle:
    case AdmissionMode::kPredicted:
      for (size_t i = 0; i < r.count; ++i) {
        int64_t generated = r.generated ? r.generated[i] : 0;
        int64_t left = r.known_lengths[i] - generated;
        // Oracle: a request at its true length has nothing left. A prediction already passed
        // says nothing: keep the max_new_tokens cap.
        if (left > 0 || mode == AdmissionMode::kOracle) out[i] = std::min(out[i], std::max<int64_t>(0, left));
      }
      return;
    case AdmissionMode::kPastFuture:
      break;
  }
  double q = sigmoid(quantile_logit_);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const int64_t* keys = options_.keyed_draws ? r.draw_keys : nullptr;
  std::vector<int64_t>& totals = scratch_totals_;
  totals.resize(r.count);
  // Requests are handled in runs of one class, so a uniform batch is one lookup and one
  // lockstep search.
  for (size_t start = 0; start < r.count;) {
    int32_t class_id = r.class_ids ? r.class_ids[start] : 0;
    size_t end = start + 1;
    while (end < r.count && (r.class_ids ? r.class_ids[end] : 0) == class_id) ++end;
    const OutputLengthHistory* history = history_for(class_id);
    const int64_t* generated = r.generated ? r.generated + start : nullptr;
    if (!history) {
      std::fill(totals.begin() + static_cast<std::ptrdiff_t>(start), totals.begin() + static_cast<std::ptrdiff_t>(end), -1);
    } else if (options_.sampling) {
      for (size_t i = start; i < end; ++i) {
        int64_t g = generated ? generated[i - start] : 0;
        size_t longer = history->count_longer(g);
        double u = keys ? keyed_uniform(options_.seed, keys[i], scenario) : uniform(rng_);
        totals[i] = longer == 0 ? -1
                                : history->conditional_select(g, std::min(longer - 1, static_cast<size_t>(u * static_cast<double>(longer))));
      }
    } else if (generated) {
      history->conditional_quantiles(generated, end - start, q, totals.data() + start);
    } else {
      int64_t total = history->conditional_quantile(0, q);
      std::fill(totals.begin() + static_cast<std::ptrdiff_t>(start), totals.begin() + static_cast<std::ptrdiff_t>(end), total);
    }
    start = end;
  }
  for (size_t i = 0; i < r.count; ++i) {
    // No finished request ran this long (or no history at all): keep max_new_tokens.
    if (totals[i] >= 0) out[i] = std::min(out[i], totals[i] - (r.generated ? r.generated[i] : 0));
  }
}

void PeakEstimator::predict_remaining(AdmissionMode mode, const RequestArrays& requests, int64_t* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_requests(mode, requests, "", "generated");
  predict_locked(mode, requests, out);
}

PeakEstimator::Scenarios PeakEstimator::scenarios_of(AdmissionMode mode) const {
  const bool sampled = options_.sampling && mode == AdmissionMode::kPastFuture;
  return {sampled ? options_.num_scenarios : 1, sampled ? options_.overflow_scenarios : 0};
}

void PeakEstimator::admission_peaks(AdmissionMode mode, const RequestArrays& requests, const size_t* prefixes,
                                    size_t num_prefixes, int64_t* peaks) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_requests(mode, requests, "", "held");
  for (size_t k = 0; k < num_prefixes; ++k) {
    KVSCHED_EXPECTS(prefixes[k] <= requests.count, std::invalid_argument, "prefixes[", k, "] must be <= ",
                    requests.count, ", got ", prefixes[k]);
  }
  const auto [scenarios, may_overflow] = scenarios_of(mode);
  std::vector<int64_t> remaining(requests.count);
  std::vector<int64_t> by_scenario(static_cast<size_t>(scenarios) * num_prefixes);  // [prefix][scenario]
  for (int s = 0; s < scenarios; ++s) {
    predict_locked(mode, requests, remaining.data(), s);
    for (size_t k = 0; k < num_prefixes; ++k) {
      by_scenario[k * scenarios + s] = future_peak(requests.held, remaining.data(), prefixes[k], options_.block_size);
    }
  }
  for (size_t k = 0; k < num_prefixes; ++k) {
    auto first = by_scenario.begin() + static_cast<std::ptrdiff_t>(k * scenarios);
    std::nth_element(first, first + may_overflow, first + scenarios, std::greater<int64_t>());
    peaks[k] = first[may_overflow];
  }
}

// The profile behind admission scans.
//
// A scan adds requests in descending `remaining` order; the peak is the largest occupancy seen at
// a completion. With a prefix of k candidates merged into the sorted running set, running item p
// sees k_p candidates ahead of it (those with a larger remaining; ties go to running first), and
// its occupancy splits into a part of the running set alone and a part of the candidates so far:
//   tokens  occ_p = [ (p+1) b_p + H(p) ]  +  Hc + k_p b_p
//   blocks  occ_p = [ Hb(p) + (p+1) qb_p + (rb_p > 0 ? 2(p+1) - A(p) : Z(p)) ]
//                   + Hc + k_p qb_p + (rb_p > 0 ? 2 k_p - C[B - rb_p] : Zc)
// where b = qb*B + rb is the remaining length, H / Hb the held tokens / blocks so far, A(p) how
// many running rests (held % B) up to p are <= B - rb_p, Z the non-zero rests so far, and Hc, C,
// Zc the same over the candidates merged so far (C a cumulative histogram of their rests). The
// bracket is `base_[p]`, the factor of k_p is `slope_[p]`, and the last term is a table lookup,
// `correction_[correction_index_[p]]`, rebuilt when a candidate joins. build_profile() computes
// the running part once per admission; each scan is then a few loads and adds per running item,
// and a running stretch before the first candidate is a lookup in `prefix_max_`.
void PeakEstimator::build_profile() {
  const int64_t bs = options_.block_size;
  const size_t n = running_items_.size(), m = candidate_items_.size();
  base_.resize(n), slope_.resize(n), prefix_max_.resize(n), held_prefix_.resize(n), nonzero_prefix_.resize(n);
  correction_index_.resize(n);
  insert_at_.resize(m), candidate_slope_.resize(m), candidate_units_.resize(m), running_at_most_.resize(m);
  candidate_rest_.resize(m);
  // Candidates in merge order, to answer their histogram queries in the same pass.
  candidate_index_.resize(m);
  for (size_t c = 0; c < m; ++c) candidate_index_[c] = static_cast<int32_t>(c);
  // Ties keep admission order; std::sort with the index as tie-break is stable without the
  // buffer std::stable_sort allocates.
  std::sort(candidate_index_.begin(), candidate_index_.end(), [&](int32_t x, int32_t y) {
    int64_t rx = candidate_items_[static_cast<size_t>(x)].remaining, ry = candidate_items_[static_cast<size_t>(y)].remaining;
    return rx != ry ? rx > ry : x < y;
  });
  // Quotient and remainder by the block size; shifts and masks when it is a power of two (the
  // common case), where 64-bit divisions would dominate the pass.
  const int shift = block_shift_;
  auto quotient = [&](int64_t v) { return shift >= 0 ? v >> shift : v / bs; };
  auto rest_of = [&](int64_t v) { return shift >= 0 ? v & (bs - 1) : v % bs; };
  std::vector<int32_t>& at_most = scan_counts_;  // cumulative histogram of running rests
  at_most.assign(bs > 0 ? static_cast<size_t>(bs) + 1 : 1, 0);
  // Small block sizes update every entry branch-free (vectorized); a loop from the rest to the
  // end would mispredict its exit once per request.
  const bool dense_update = bs <= kDenseHistogramLimit;
  int64_t held = 0, nonzero = 0, peak = 0;
  size_t next = 0;  // next candidate (merge order) to place
  auto place_candidates = [&](size_t p, int64_t remaining_bound, bool all) {
    // Candidates with a remaining larger than the running item at p go before it.
    while (next < m) {
      size_t c = static_cast<size_t>(candidate_index_[next]);
      const Item& item = candidate_items_[c];
      if (!all && item.remaining <= remaining_bound) break;
      insert_at_[c] = static_cast<int64_t>(p);
      if (bs > 0) {
        candidate_slope_[c] = quotient(item.remaining);
        int64_t rb = rest_of(item.remaining);
        candidate_rest_[c] = static_cast<int32_t>(rest_of(item.held));
        running_at_most_[c] = rb > 0 ? at_most[static_cast<size_t>(bs - rb)] : -1;
      } else {
        candidate_slope_[c] = item.remaining;
      }
      candidate_units_[c] = bs > 0 ? quotient(item.held) : item.held;  // whole blocks: rests count apart
      ++next;
    }
  };
  for (size_t p = 0; p < n; ++p) {
    const Item& item = running_items_[p];
    place_candidates(p, item.remaining, false);
    const int64_t count = static_cast<int64_t>(p) + 1;
    if (bs > 0) {
      held += quotient(item.held);
      int64_t rest = rest_of(item.held), qb = quotient(item.remaining), rb = rest_of(item.remaining);
      nonzero += rest > 0;
      if (dense_update) {
        const int32_t rest32 = static_cast<int32_t>(rest), size32 = static_cast<int32_t>(bs);
        int32_t* counts = at_most.data();
        for (int32_t x = 0; x <= size32; ++x) counts[x] += x >= rest32 ? 1 : 0;
      } else {
        for (int64_t x = rest; x <= bs; ++x) ++at_most[static_cast<size_t>(x)];
      }
      slope_[p] = qb;
      base_[p] = held + count * qb + (rb > 0 ? 2 * count - at_most[static_cast<size_t>(bs - rb)] : nonzero);
      correction_index_[p] = static_cast<int32_t>(rb > 0 ? bs - rb : bs + 1);
    } else {
      held += item.held;
      slope_[p] = item.remaining;
      base_[p] = count * item.remaining + held;
      correction_index_[p] = 0;
    }
    held_prefix_[p] = held;
    nonzero_prefix_[p] = nonzero;
    peak = std::max(peak, base_[p]);
    prefix_max_[p] = peak;
  }
  segment_base_max_.resize((n + kProfileSegment - 1) / kProfileSegment);
  segment_slope_max_.resize(segment_base_max_.size());
  for (size_t segment = 0; segment < segment_base_max_.size(); ++segment) {
    const size_t first = segment * kProfileSegment, last = std::min(n, first + kProfileSegment);
    int64_t base_max = 0, slope_max = 0;
    for (size_t p = first; p < last; ++p) base_max = std::max(base_max, base_[p]), slope_max = std::max(slope_max, slope_[p]);
    segment_base_max_[segment] = base_max;
    segment_slope_max_[segment] = slope_max;
  }
  place_candidates(n, 0, true);
}

bool PeakEstimator::fits_with_prefix(size_t prefix, int64_t budget) {
  const int64_t bs = options_.block_size;
  const size_t n = running_items_.size();
  if (prefix == 0) return n == 0 || prefix_max_[n - 1] <= budget;  // the running set alone
  // The prefix's candidates in merge order.
  prefix_order_.clear();
  for (int32_t c : candidate_index_) {
    if (static_cast<size_t>(c) < prefix) prefix_order_.push_back(static_cast<uint32_t>(c));
  }
  // correction_[x] for x <= B: 2k - C[x]; [B + 1]: Zc (blocks). Tokens: one zero entry.
  correction_.assign(bs > 0 ? static_cast<size_t>(bs) + 2 : 1, 0);
  int64_t* correction = correction_.data();
  const int64_t* base = base_.data();
  const int64_t* slope = slope_.data();
  const int32_t* index = correction_index_.data();
  // The largest correction: 2k - C[x] falls with x, so it is entry 0 or the Zc entry.
  int64_t largest_correction = 0;
  int64_t k = 0, units = 0;
  size_t p = 0;
  // Whether every running item in [p, end) stays within budget. A segment whose bound (its
  // largest base and slope, the largest correction) is within budget is skipped unread: only
  // the few segments near the peak are scanned item by item.
  auto running_fit = [&](size_t end) {
    if (k == 0) {
      bool fits = end == 0 || prefix_max_[end - 1] <= budget;
      p = end;
      return fits;
    }
    const int64_t limit = budget - units;
    while (p < end) {
      size_t segment = p / kProfileSegment, segment_end = std::min(end, (segment + 1) * kProfileSegment);
      if (p % kProfileSegment == 0 && segment_end == std::min(n, (segment + 1) * kProfileSegment) &&
          segment_base_max_[segment] + k * segment_slope_max_[segment] + largest_correction <= limit) {
        p = segment_end;
        continue;
      }
      int64_t local = 0;
      for (size_t q = p; q < segment_end; ++q) local = std::max(local, base[q] + k * slope[q] + correction[index[q]]);
      if (local > limit) return false;
      p = segment_end;
    }
    return true;
  };
  for (uint32_t c : prefix_order_) {
    if (!running_fit(static_cast<size_t>(insert_at_[c]))) return false;
    ++k;
    units += candidate_units_[c];
    const int64_t count = static_cast<int64_t>(p) + k;  // requests up to and including c
    int64_t occupancy = (p > 0 ? held_prefix_[p - 1] : 0) + units + count * candidate_slope_[c];
    if (bs > 0) {
      // The candidate joins the histogram: entries x >= its rest count one more.
      int32_t rest = candidate_rest_[c];
      for (int64_t x = 0; x <= bs; ++x) correction[x] += 2 - (x >= rest ? 1 : 0);
      if (rest > 0) ++correction[bs + 1];
      largest_correction = std::max(correction[0], correction[bs + 1]);
      int64_t rb = candidate_items_[c].remaining % bs;  // once per candidate: a division is fine
      if (rb > 0) {
        // 2k - C[x] is stored; the candidate's own count needs the running rests before it too.
        occupancy += 2 * count - running_at_most_[c] - (2 * k - correction[bs - rb]);
      } else {
        occupancy += (p > 0 ? nonzero_prefix_[p - 1] : 0) + correction[bs + 1];
      }
    }
    if (occupancy > budget) return false;
  }
  return running_fit(n);
}

int64_t PeakEstimator::admit(AdmissionMode mode, const RequestArrays& running, const RequestArrays& candidates,
                             int64_t capacity, int64_t reserve) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(capacity > 0, std::invalid_argument, "capacity must be > 0, got ", capacity);
  KVSCHED_EXPECTS(reserve >= 0 && reserve <= capacity, std::invalid_argument, "reserve must be in [0, capacity], got ",
                  reserve);
  check_requests(mode, running, "running_", "held");
  check_requests(mode, candidates, "candidate_", "prompt");
  // The profile counts requests in 32 bits.
  KVSCHED_EXPECTS(running.count + candidates.count < (size_t{1} << 31), std::invalid_argument,
                  "running_held and candidate_prompt together must have < 2^31 requests, got ",
                  running.count + candidates.count);
  int64_t budget = capacity - reserve;
  const auto [scenarios, may_overflow] = scenarios_of(mode);
  // The occupancy now is a lower bound of the peak in every scenario: candidates past the first
  // that does not fit now can never be admitted, so none of them is predicted (a full cache with
  // a long queue is the common case under load, and admission runs every step).
  int64_t occupied = 0;
  for (size_t i = 0; i < running.count; ++i) occupied += held_units(running.held[i]);
  size_t fitting_now = 0;
  while (fitting_now < candidates.count && (occupied += held_units(candidates.held[fitting_now])) <= budget) {
    ++fitting_now;
  }
  if (fitting_now == 0) return 0;
  RequestArrays considered = candidates;
  considered.count = fitting_now;
  // A prefix fits a scenario iff it is no longer than that scenario's largest fitting prefix, so
  // the answer is the (may_overflow + 1)-th smallest of those. Each scenario's scan is bounded by
  // the smallest largest-prefix found so far only when every scenario must fit.
  scenario_admits_.clear();
  int64_t admitted = static_cast<int64_t>(considered.count);
  for (int s = 0; s < scenarios && (admitted > 0 || may_overflow > 0); ++s) {
    if (may_overflow > 0) admitted = static_cast<int64_t>(considered.count);
    scratch_remaining_.resize(std::max(running.count, considered.count));
    predict_locked(mode, running, scratch_remaining_.data(), s);
    running_items_.resize(running.count);
    for (size_t i = 0; i < running.count; ++i) running_items_[i] = Item{scratch_remaining_[i], running.held[i]};
    sort_by_remaining_descending(running_items_, merge_scratch_);
    predict_locked(mode, considered, scratch_remaining_.data(), s);
    candidate_items_.resize(considered.count);
    for (size_t i = 0; i < considered.count; ++i) candidate_items_[i] = Item{scratch_remaining_[i], considered.held[i]};
    // The peak grows with every candidate added, so the admissible candidates form a prefix. The
    // occupancy now (t = 0) is a lower bound of the peak: it caps the prefix before any scan.
    build_profile();
    const size_t n = running_items_.size();
    int64_t now = n > 0 ? held_prefix_[n - 1] + nonzero_prefix_[n - 1] : 0;  // running units held
    int64_t high = 0;
    while (high < admitted && (now += held_units(candidate_items_[static_cast<size_t>(high)].held)) <= budget) ++high;
    if (!fits_with_prefix(0, budget)) {
      admitted = 0;
      scenario_admits_.push_back(0);
      continue;
    }
    // Occupancy is additive over requests at every instant, so peak(R + C) <= peak(R) + sum of
    // each candidate's own peak: a prefix whose own peaks fit in the slack fits for sure.
    int64_t slack = budget - (n > 0 ? prefix_max_[n - 1] : 0);
    int64_t low = 0;  // the prefix of `low` candidates fits; find the largest fitting one <= high
    while (low < high) {
      const Item& item = candidate_items_[static_cast<size_t>(low)];
      slack -= held_units(item.held + item.remaining);  // a lone request peaks when it finishes
      if (slack < 0) break;
      ++low;
    }
    while (low < high) {
      int64_t middle = low + (high - low + 1) / 2;
      if (fits_with_prefix(static_cast<size_t>(middle), budget)) low = middle;
      else high = middle - 1;
    }
    admitted = low;
    scenario_admits_.push_back(low);
  }
  if (may_overflow == 0) return admitted;
  std::nth_element(scenario_admits_.begin(), scenario_admits_.begin() + may_overflow, scenario_admits_.end());
  return scenario_admits_[static_cast<size_t>(may_overflow)];
}

}  // namespace kvsched
