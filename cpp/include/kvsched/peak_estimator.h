// Peak-memory future estimation and admission control (after LightLLM's Past-Future scheduler).
//
// Glossary
//   held a_i       KV tokens a request holds now (for a waiting candidate: its prompt).
//   remaining b_i  tokens it is predicted to still generate; it finishes after b_i more steps and
//                  releases everything.
//   future peak    occupancy only rises between completions, so the peak is reached at a
//                  completion: with b sorted descending, max_j ( j * b_(j) + sum_{i<=j} a_(i) )
//                  in tokens; in blocks, sum_{i<=j} ceil((a_(i) + b_(j)) / block_size).
//   mode           where b comes from: aggressive (0: no growth), conservative (max_new_tokens),
//                  past_future (a quantile, or a random draw, of the history of finished output
//                  lengths L conditioned on L > generated), oracle (true lengths, simulation only)
//                  or predicted (lengths from the caller's own predictor).
//   scenario       with sampling, one draw of every request's remaining length; admission
//                  takes the largest prefix of candidates whose peak fits in all but
//                  `overflow_scenarios` of the `num_scenarios` scenarios.
//   keyed draw     with sampling, a request's draw u in [0, 1) is a hash of (seed, request id,
//                  scenario); its remaining length is the u-quantile of L | L > generated, so the
//                  request keeps its place in the distribution as it generates.
//   safety quantile  the quantile past_future uses; adaptive: raised after preemptions, relaxed
//                  while admissions go by without one, so the preemption rate tracks a target.
// A non-oracle mode never reads a true length: only kOracle and kPredicted read `known_lengths`.
// Thread safety: every public method takes an internal mutex.
#pragma once

#include <cstdint>
#include <mutex>
#include <random>
#include <unordered_map>
#include <vector>

#include "kvsched/limits.h"
#include "kvsched/output_length_history.h"

namespace kvsched {

enum class AdmissionMode : int { kAggressive = 0, kConservative = 1, kPastFuture = 2, kOracle = 3, kPredicted = 4 };

// Requests as parallel arrays of length `count`. Optional arrays may be null: generated (0),
// class_ids (class 0), known_lengths (required by kOracle and kPredicted only).
struct RequestArrays {
  const int64_t* held = nullptr;
  const int64_t* generated = nullptr;
  const int64_t* max_new_tokens = nullptr;
  const int32_t* class_ids = nullptr;
  const int64_t* known_lengths = nullptr;
  // Request ids, optional: with sampling and keyed_draws, a request's draw is a function of its
  // id, the scenario and the seed, so it holds from one call to the next.
  const int64_t* draw_keys = nullptr;
  size_t count = 0;
};

struct PeakEstimatorOptions {
  int32_t window = 1000;
  int32_t block_size = 0;  // 0: count tokens; otherwise count blocks of this many tokens
  double quantile = 0.9;
  bool adaptive = true;
  double target_preemption_rate = 0.01;  // preemptions per admitted request
  double adapt_gain = 0.1;               // logit step per preemption
  double min_quantile = 0.5;
  double max_quantile = 0.999;
  bool sampling = false;  // draw remaining lengths instead of taking the quantile
  int32_t num_scenarios = 1;
  // Sampling: in how many of the num_scenarios draws an admitted batch may overflow (0: it must
  // fit every one). The admission's risk: a batch overflows with a probability of about
  // (overflow_scenarios + 1) / (num_scenarios + 1) at most; where a preemption is cheap beside the
  // steps a fuller batch saves, taking that risk pays.
  int32_t overflow_scenarios = 0;
  // Draws keyed by request (when the caller passes ids): each request keeps its draws from step
  // to step (common random numbers), where fresh draws at every call would admit a candidate at
  // the first step whose draws happen to be low, a lottery that erodes the scenarios' margin.
  bool keyed_draws = true;
  uint64_t seed = 0;
  std::vector<int64_t> prior;  // lengths that fill every window until real ones push them out
};

namespace detail {
struct PeakItem {  // one request in a peak computation
  int64_t remaining;
  int64_t held;
};
}  // namespace detail

// Exact future peak of a set of requests (tokens, or blocks when block_size > 0).
int64_t future_peak(const int64_t* held, const int64_t* remaining, size_t count, int32_t block_size);

class PeakEstimator {
 public:
  explicit PeakEstimator(PeakEstimatorOptions options);

  const PeakEstimatorOptions& options() const { return options_; }

  // Finished requests' output lengths, with their classes (null: class 0).
  void record(const int64_t* lengths, const int32_t* class_ids, size_t count);

  // Predicted remaining tokens of each request under `mode` (one scenario when sampling).
  void predict_remaining(AdmissionMode mode, const RequestArrays& requests, int64_t* out);

  // The future peak of the first `prefixes[k]` requests, for each k, as admission sees it: with
  // sampling, the (overflow_scenarios + 1)-th largest over the scenarios (admission lets that many
  // overflow); otherwise the single prediction's. One scenario's draw is a poor load signal: a
  // dispatcher choosing the instance with the most room picks the luckiest draws.
  void admission_peaks(AdmissionMode mode, const RequestArrays& requests, const size_t* prefixes,
                       size_t num_prefixes, int64_t* peaks);

  // How many leading candidates can join `running` with the future peak <= capacity - reserve.
  int64_t admit(AdmissionMode mode, const RequestArrays& running, const RequestArrays& candidates,
                int64_t capacity, int64_t reserve);

  // Feedback for the adaptive quantile: requests preempted and admitted since the last call.
  void observe(int64_t preempted, int64_t admitted);

  // Changes overflow_scenarios (same range as the option): a risk priced while the engine runs.
  void set_overflow_scenarios(int32_t overflow_scenarios);

  double quantile() const;
  size_t history_size(int32_t class_id) const;  // -1: all classes together

 private:
  using Item = detail::PeakItem;
  void check_requests(AdmissionMode mode, const RequestArrays& requests, const char* prefix,
                      const char* held_name) const;
  void predict_locked(AdmissionMode mode, const RequestArrays& requests, int64_t* out, int scenario = 0);
  // The scenarios admission weighs in `mode`, and how many of them may overflow: admit() and
  // admission_peaks() must agree on both.
  struct Scenarios {
    int count;
    int may_overflow;
  };
  Scenarios scenarios_of(AdmissionMode mode) const;
  const OutputLengthHistory* history_for(int32_t class_id) const;
  // Precomputes, for the sorted running_items_ and the candidate_items_, everything a scan of
  // "running plus a prefix of candidates" needs that does not depend on the prefix (the formulas
  // are above build_profile() in peak_estimator.cpp).
  void build_profile();
  // Whether running_items_ plus the first `prefix` candidate_items_ peak within budget (after
  // build_profile()).
  bool fits_with_prefix(size_t prefix, int64_t budget);
  int64_t held_units(int64_t held) const {  // tokens, or blocks when counting blocks
    if (options_.block_size <= 0) return held;
    int64_t last = held + options_.block_size - 1;
    return block_shift_ >= 0 ? last >> block_shift_ : last / options_.block_size;
  }

  PeakEstimatorOptions options_;
  int block_shift_ = -1;  // log2(block_size) when it is a power of two, else -1
  mutable std::mutex mutex_;
  OutputLengthHistory all_classes_;
  struct ClassHistory {
    OutputLengthHistory lengths;
    uint64_t last_record = 0;  // record_clock_ when the class last finished a request
  };
  std::unordered_map<int32_t, ClassHistory> by_class_;  // at most kMaxClassHistories (limits.h)
  uint64_t record_clock_ = 0;
  double quantile_logit_;
  std::mt19937_64 rng_;
  std::vector<int64_t> scratch_remaining_, scratch_totals_;
  std::vector<int64_t> scenario_admits_;  // admit(): each scenario's largest fitting prefix
  std::vector<Item> running_items_, candidate_items_, merge_scratch_;
  std::vector<int32_t> scan_counts_;
  // The profile (build_profile): per running position p, and per candidate c.
  std::vector<int64_t> base_, slope_, prefix_max_, held_prefix_, nonzero_prefix_;
  std::vector<int64_t> segment_base_max_, segment_slope_max_;  // per kProfileSegment positions
  std::vector<int32_t> correction_index_;
  std::vector<int64_t> insert_at_, candidate_slope_, candidate_units_, running_at_most_;
  std::vector<int32_t> candidate_rest_, candidate_index_;
  std::vector<uint32_t> prefix_order_;
  std::vector<int64_t> correction_;
};

}  // namespace kvsched
