// PeakEstimator and future_peak invariants (cpp/include/kvsched/peak_estimator.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

#include "kvsched/peak_estimator.h"

namespace kvsched {
namespace {

int64_t units(int64_t tokens, int32_t block_size) {
  return block_size > 0 ? (tokens + block_size - 1) / block_size : tokens;
}

// The definition, step by step: at time t every request with remaining >= t holds held + t tokens
// (those with less have finished and released everything); the peak is the largest occupancy.
int64_t brute_force_peak(const std::vector<int64_t>& held, const std::vector<int64_t>& remaining, int32_t bs) {
  int64_t longest = 0;
  for (int64_t r : remaining) longest = std::max(longest, r);
  int64_t peak = 0;
  for (int64_t t = 0; t <= longest; ++t) {
    int64_t occupancy = 0;
    for (size_t i = 0; i < held.size(); ++i) {
      if (remaining[i] >= t) occupancy += units(held[i] + t, bs);
    }
    peak = std::max(peak, occupancy);
  }
  return peak;
}

struct Batch {
  std::vector<int64_t> held, generated, max_new_tokens, known;
  std::vector<int64_t> ids;
  void push(int64_t h, int64_t g, int64_t m, int64_t k, int64_t id) {
    held.push_back(h);
    generated.push_back(g);
    max_new_tokens.push_back(m);
    known.push_back(k);
    ids.push_back(id);
  }
  RequestArrays view(size_t count = static_cast<size_t>(-1)) const {
    RequestArrays r;
    r.count = std::min(count, held.size());
    if (r.count == 0) return r;
    r.held = held.data();
    r.generated = generated.data();
    r.max_new_tokens = max_new_tokens.data();
    r.known_lengths = known.data();
    r.draw_keys = ids.data();
    return r;
  }
};

// A sampled past_future estimator (keyed draws, no adaptation) that has learned 300 output lengths
// in [1, 400] drawn from `rng`.
std::unique_ptr<PeakEstimator> sampled_estimator(std::mt19937& rng, int num_scenarios, uint64_t seed) {
  PeakEstimatorOptions o;
  o.block_size = 16;
  o.sampling = true;
  o.num_scenarios = num_scenarios;
  o.adaptive = false;
  o.seed = seed;
  auto estimator = std::make_unique<PeakEstimator>(o);
  std::vector<int64_t> lengths;
  for (int i = 0; i < 300; ++i) lengths.push_back(1 + static_cast<int64_t>(rng() % 400));
  estimator->record(lengths.data(), nullptr, lengths.size());
  return estimator;
}

Batch random_batch(std::mt19937& rng, int max_count, bool running, int64_t first_id) {
  Batch b;
  const int count = static_cast<int>(rng() % static_cast<unsigned>(max_count + 1));
  for (int i = 0; i < count; ++i) {
    int64_t prompt = 1 + rng() % 300;
    int64_t generated = running ? rng() % 60 : 0;
    int64_t max_new = generated + 1 + rng() % 300;
    int64_t known = 1 + rng() % max_new;
    b.push(prompt + generated, generated, max_new, known, first_id + i);
  }
  return b;
}

// The remaining tokens conservative admission plans with, and the peak of running + a prefix.
int64_t conservative_peak(const Batch& running, const Batch& candidates, size_t prefix, int32_t bs) {
  std::vector<int64_t> held, remaining;
  for (size_t i = 0; i < running.held.size(); ++i) {
    held.push_back(running.held[i]);
    remaining.push_back(running.max_new_tokens[i] - running.generated[i]);
  }
  for (size_t i = 0; i < prefix; ++i) {
    held.push_back(candidates.held[i]);
    remaining.push_back(candidates.max_new_tokens[i] - candidates.generated[i]);
  }
  return future_peak(held.data(), remaining.data(), held.size(), bs);
}

// Why: admission is only as safe as this number. The closed form (sorted scan with a Fenwick tree
// for blocks) must equal the definition, and the peak is at least what is held now and at most
// everything held and generated at once.
TEST(FuturePeak, MatchesTheDefinitionAndIsBoundedByCurrentUse) {
  std::mt19937 rng(42);
  for (int32_t bs : {0, 1, 4, 16, 7}) {
    for (int trial = 0; trial < 300; ++trial) {
      const size_t n = rng() % 12;
      std::vector<int64_t> held(n), remaining(n);
      int64_t now = 0, all = 0;
      for (size_t i = 0; i < n; ++i) {
        held[i] = rng() % 100;
        remaining[i] = rng() % 60;
        now += units(held[i], bs);
        all += units(held[i] + remaining[i], bs);
      }
      const int64_t peak = future_peak(held.data(), remaining.data(), n, bs);
      ASSERT_EQ(peak, brute_force_peak(held, remaining, bs)) << "block_size " << bs << " trial " << trial;
      EXPECT_GE(peak, now);
      EXPECT_LE(peak, all);
    }
  }
}

// Why: admission takes a prefix of the queue because the peak only grows as requests are added;
// if adding one could lower it, the prefix rule would turn requests away wrongly.
TEST(FuturePeak, IsMonotoneInAddingARequest) {
  std::mt19937 rng(7);
  for (int32_t bs : {0, 16}) {
    for (int trial = 0; trial < 300; ++trial) {
      std::vector<int64_t> held, remaining;
      int64_t previous = 0;
      for (int i = 0; i < 20; ++i) {
        held.push_back(1 + rng() % 500);
        remaining.push_back(rng() % 500);
        const int64_t peak = future_peak(held.data(), remaining.data(), held.size(), bs);
        ASSERT_GE(peak, previous) << "adding request " << i << " lowered the peak";
        previous = peak;
      }
    }
  }
}

TEST(FuturePeak, RefusesNegativeInput) {
  std::vector<int64_t> held = {4, -1}, remaining = {1, 1};
  EXPECT_THROW(future_peak(held.data(), remaining.data(), 2, 16), std::invalid_argument);
  EXPECT_EQ(future_peak(nullptr, nullptr, 0, 16), 0);
}

// Why: the admitted prefix is what the KV cache is promised to hold: under conservative admission
// (every request runs to max_new_tokens) its peak never exceeds capacity - reserve, it is the
// largest such prefix, and what it holds right now fits too.
TEST(PeakEstimatorAdmit, LargestAdmissiblePrefixNeverExceedsCapacity) {
  std::mt19937 rng(2024);
  for (int32_t bs : {0, 16}) {
    PeakEstimatorOptions o;
    o.block_size = bs;
    PeakEstimator estimator(o);
    int checked_partial = 0;
    for (int trial = 0; trial < 400; ++trial) {
      Batch running = random_batch(rng, 12, /*running=*/true, 0);
      Batch candidates = random_batch(rng, 12, /*running=*/false, 1000);
      const int64_t capacity = 1 + static_cast<int64_t>(rng() % (bs > 0 ? 300 : 5000));
      const int64_t reserve = static_cast<int64_t>(rng() % static_cast<unsigned>(capacity / 4 + 1));
      const int64_t admitted =
          estimator.admit(AdmissionMode::kConservative, running.view(), candidates.view(), capacity, reserve);
      ASSERT_GE(admitted, 0);
      ASSERT_LE(admitted, static_cast<int64_t>(candidates.held.size()));
      if (admitted > 0) {
        EXPECT_LE(conservative_peak(running, candidates, static_cast<size_t>(admitted), bs), capacity - reserve)
            << "trial " << trial;
      }
      if (admitted < static_cast<int64_t>(candidates.held.size())) {
        EXPECT_GT(conservative_peak(running, candidates, static_cast<size_t>(admitted) + 1, bs), capacity - reserve)
            << "trial " << trial << ": a longer prefix fits too";
        ++checked_partial;
      }
    }
    EXPECT_GT(checked_partial, 50);  // the capacities did cut queues short
  }
}

// Why: the modes differ only in how much growth they predict (aggressive none, conservative
// max_new_tokens, past_future a history quantile capped by max_new_tokens, oracle the true
// length); since the peak is monotone in the remaining lengths, the admitted counts are ordered.
TEST(PeakEstimatorAdmit, ModesAreOrderedByPredictedGrowth) {
  std::mt19937 rng(99);
  PeakEstimatorOptions o;
  o.block_size = 16;
  o.adaptive = false;
  PeakEstimator estimator(o);
  std::vector<int64_t> lengths;
  for (int i = 0; i < 200; ++i) lengths.push_back(5 + static_cast<int64_t>(rng() % 120));
  estimator.record(lengths.data(), nullptr, lengths.size());
  int aggressive_more = 0, past_future_more = 0;
  for (int trial = 0; trial < 300; ++trial) {
    Batch running = random_batch(rng, 10, true, 0);
    Batch candidates = random_batch(rng, 16, false, 1000);
    const int64_t capacity = 20 + static_cast<int64_t>(rng() % 200);
    auto admit = [&](AdmissionMode mode) {
      return estimator.admit(mode, running.view(), candidates.view(), capacity, 0);
    };
    const int64_t aggressive = admit(AdmissionMode::kAggressive);
    const int64_t past_future = admit(AdmissionMode::kPastFuture);
    const int64_t oracle = admit(AdmissionMode::kOracle);
    const int64_t conservative = admit(AdmissionMode::kConservative);
    EXPECT_GE(aggressive, past_future);
    EXPECT_GE(past_future, conservative);
    EXPECT_GE(aggressive, oracle);
    EXPECT_GE(oracle, conservative);
    aggressive_more += aggressive > conservative;
    past_future_more += past_future > conservative;
  }
  EXPECT_GT(aggressive_more, 0);
  EXPECT_GT(past_future_more, 0);
}

// Why: every mode respects max_new_tokens, and only oracle/predicted read true lengths.
TEST(PeakEstimatorPredict, RemainingIsCappedByMaxNewTokens) {
  PeakEstimatorOptions o;
  PeakEstimator estimator(o);
  Batch b;
  b.push(100, 10, 50, 30, 1);   // 40 left at most, 20 in truth
  b.push(100, 0, 500, 400, 2);  // 500 left at most, 400 in truth
  b.push(100, 20, 20, 20, 3);   // at its cap: nothing left
  std::vector<int64_t> out(3);
  estimator.predict_remaining(AdmissionMode::kConservative, b.view(), out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{40, 500, 0}));
  estimator.predict_remaining(AdmissionMode::kAggressive, b.view(), out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{0, 0, 0}));
  estimator.predict_remaining(AdmissionMode::kOracle, b.view(), out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{20, 400, 0}));
  // No history yet: past_future cannot predict and keeps max_new_tokens.
  estimator.predict_remaining(AdmissionMode::kPastFuture, b.view(), out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{40, 500, 0}));
  std::vector<int64_t> lengths(100, 60);
  estimator.record(lengths.data(), nullptr, lengths.size());
  estimator.predict_remaining(AdmissionMode::kPastFuture, b.view(), out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{40, 60, 0}));  // 60 - 10 = 50 capped to 40; 60 - 0
}

// Why: with sampled scenarios, allowing more of them to overflow is taking more risk: it never
// admits fewer. Keyed draws make admission repeatable from call to call.
TEST(PeakEstimatorAdmit, OverflowRiskIsMonotoneAndKeyedDrawsRepeat) {
  std::mt19937 rng(5);
  const int num_scenarios = 8;
  auto owned = sampled_estimator(rng, num_scenarios, 11);
  PeakEstimator& estimator = *owned;
  for (int trial = 0; trial < 100; ++trial) {
    Batch running = random_batch(rng, 10, true, 0);
    Batch candidates = random_batch(rng, 16, false, 1000);
    const int64_t capacity = 40 + static_cast<int64_t>(rng() % 200);
    int64_t previous = -1;
    for (int32_t overflow = 0; overflow < num_scenarios; ++overflow) {
      estimator.set_overflow_scenarios(overflow);
      const int64_t admitted =
          estimator.admit(AdmissionMode::kPastFuture, running.view(), candidates.view(), capacity, 0);
      EXPECT_GE(admitted, previous) << "overflow_scenarios " << overflow;
      EXPECT_EQ(admitted, estimator.admit(AdmissionMode::kPastFuture, running.view(), candidates.view(), capacity, 0));
      previous = admitted;
    }
  }
}

// Why: a dispatcher reads admission_peaks as an instance's room; it is only honest if it is the
// peak admission acts on. Capacity equal to the peak of running + k candidates admits k of them
// (or more), one block less admits fewer, in every overflow setting.
TEST(PeakEstimatorAdmissionPeaks, AreThePeaksAdmissionActsOn) {
  std::mt19937 rng(9);
  const int num_scenarios = 6;
  auto owned = sampled_estimator(rng, num_scenarios, 4);
  PeakEstimator& estimator = *owned;
  for (int trial = 0; trial < 60; ++trial) {
    estimator.set_overflow_scenarios(trial % num_scenarios);
    Batch running = random_batch(rng, 8, true, 0);
    Batch candidates = random_batch(rng, 8, false, 1000);
    Batch all = running;
    for (size_t i = 0; i < candidates.held.size(); ++i) {
      all.push(candidates.held[i], candidates.generated[i], candidates.max_new_tokens[i], candidates.known[i],
               candidates.ids[i]);
    }
    std::vector<size_t> prefixes;
    for (size_t k = 0; k <= candidates.held.size(); ++k) prefixes.push_back(running.held.size() + k);
    std::vector<int64_t> peaks(prefixes.size());
    estimator.admission_peaks(AdmissionMode::kPastFuture, all.view(), prefixes.data(), prefixes.size(), peaks.data());
    for (size_t k = 1; k < prefixes.size(); ++k) {
      EXPECT_GE(peaks[k], peaks[k - 1]);
      EXPECT_GE(estimator.admit(AdmissionMode::kPastFuture, running.view(), candidates.view(), peaks[k], 0),
                static_cast<int64_t>(k));
      if (peaks[k] > peaks[k - 1]) {
        EXPECT_LT(estimator.admit(AdmissionMode::kPastFuture, running.view(), candidates.view(), peaks[k] - 1, 0),
                  static_cast<int64_t>(k));
      }
    }
  }
  const size_t too_long = 3;  // a prefix longer than the requests
  int64_t unused = 0;
  Batch one;
  one.push(10, 0, 10, 5, 1);
  one.push(10, 0, 10, 5, 2);
  EXPECT_THROW(estimator.admission_peaks(AdmissionMode::kPastFuture, one.view(), &too_long, 1, &unused),
               std::invalid_argument);
}

// Why: the adaptive quantile is the feedback loop that keeps the preemption rate at its target:
// preemptions raise it, quiet admissions relax it, and it stays within [min, max].
TEST(PeakEstimatorAdaptive, QuantileFollowsPreemptionsWithinBounds) {
  PeakEstimatorOptions o;
  PeakEstimator estimator(o);
  const double start = estimator.quantile();
  estimator.observe(3, 10);
  const double raised = estimator.quantile();
  EXPECT_GT(raised, start);
  estimator.observe(0, 100);
  EXPECT_LT(estimator.quantile(), raised);
  for (int i = 0; i < 1000; ++i) estimator.observe(50, 0);
  EXPECT_LE(estimator.quantile(), o.max_quantile + 1e-12);
  for (int i = 0; i < 1000; ++i) estimator.observe(0, 1000);
  EXPECT_GE(estimator.quantile(), o.min_quantile - 1e-12);
  EXPECT_THROW(estimator.observe(-1, 0), std::invalid_argument);
}

// Why: errors.h: bad input throws std::invalid_argument before anything changes.
TEST(PeakEstimatorErrors, BadInputThrowsAndChangesNothing) {
  PeakEstimatorOptions bad;
  bad.quantile = 1.5;
  EXPECT_THROW(PeakEstimator{bad}, std::invalid_argument);
  bad = PeakEstimatorOptions{};
  bad.num_scenarios = 0;
  EXPECT_THROW(PeakEstimator{bad}, std::invalid_argument);
  bad = PeakEstimatorOptions{};
  bad.num_scenarios = 2;
  bad.overflow_scenarios = 2;
  EXPECT_THROW(PeakEstimator{bad}, std::invalid_argument);
  bad = PeakEstimatorOptions{};
  bad.block_size = -1;
  EXPECT_THROW(PeakEstimator{bad}, std::invalid_argument);

  PeakEstimatorOptions o;
  o.num_scenarios = 4;
  o.sampling = true;
  PeakEstimator estimator(o);
  Batch running, candidates;
  running.push(10, 1, 20, 5, 1);
  candidates.push(10, 0, 20, 5, 2);
  EXPECT_THROW(estimator.admit(AdmissionMode::kConservative, running.view(), candidates.view(), 0, 0),
               std::invalid_argument);
  EXPECT_THROW(estimator.admit(AdmissionMode::kConservative, running.view(), candidates.view(), 10, 11),
               std::invalid_argument);
  EXPECT_THROW(estimator.admit(static_cast<AdmissionMode>(9), running.view(), candidates.view(), 100, 0),
               std::invalid_argument);
  RequestArrays no_lengths = candidates.view();
  no_lengths.known_lengths = nullptr;
  EXPECT_THROW(estimator.admit(AdmissionMode::kOracle, running.view(), no_lengths, 100, 0), std::invalid_argument);
  Batch negative;
  negative.push(-3, 0, 20, 5, 3);
  EXPECT_THROW(estimator.admit(AdmissionMode::kConservative, negative.view(), candidates.view(), 100, 0),
               std::invalid_argument);

  std::vector<int64_t> lengths = {10, -1};
  EXPECT_THROW(estimator.record(lengths.data(), nullptr, 2), std::invalid_argument);
  EXPECT_EQ(estimator.history_size(-1), 0u);  // the valid first length was not recorded either
  EXPECT_THROW(estimator.set_overflow_scenarios(4), std::invalid_argument);
  EXPECT_EQ(estimator.options().overflow_scenarios, 0);
}

}  // namespace
}  // namespace kvsched
