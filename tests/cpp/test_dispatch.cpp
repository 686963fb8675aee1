// Cluster dispatch policies (cpp/include/kvsched/dispatch.h).
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "kvsched/dispatch.h"

namespace kvsched {
namespace {

struct Cluster {
  std::vector<uint8_t> available;
  std::vector<int64_t> load, headroom, capacity;
  std::vector<int64_t> tokens, blocks, hits;
  DispatchInput input(double imbalance = 0.1, bool global_queue = false) const {
    DispatchInput in;
    in.num_instances = available.size();
    in.num_requests = tokens.size();
    in.available = available.data();
    in.load_tokens = load.data();
    in.headroom_blocks = headroom.data();
    in.capacity_tokens = capacity.data();
    in.request_tokens = tokens.data();
    in.request_blocks = blocks.data();
    in.prefix_hits = hits.empty() ? nullptr : hits.data();
    in.imbalance_limit = imbalance;
    in.global_queue = global_queue;
    return in;
  }
};

Cluster idle(size_t instances, size_t requests) {
  Cluster c;
  c.available.assign(instances, 1);
  c.load.assign(instances, 0);
  c.headroom.assign(instances, 1000);
  c.capacity.assign(instances, 10000);
  c.tokens.assign(requests, 100);
  c.blocks.assign(requests, 10);
  return c;
}

// Why: round robin is the baseline every other policy is measured against: it must cycle through
// the available instances from the cursor, skip unavailable ones and carry the cursor over.
TEST(Dispatch, RoundRobinCyclesAndSkipsUnavailable) {
  Cluster c = idle(3, 7);
  int64_t cursor = 0;
  EXPECT_EQ(dispatch(DispatchPolicy::kRoundRobin, c.input(), cursor), (std::vector<int32_t>{0, 1, 2, 0, 1, 2, 0}));
  EXPECT_EQ(cursor, 1);
  EXPECT_EQ(dispatch(DispatchPolicy::kRoundRobin, c.input(), cursor), (std::vector<int32_t>{1, 2, 0, 1, 2, 0, 1}));
  EXPECT_EQ(cursor, 2);
  c.available[1] = 0;
  cursor = 0;
  EXPECT_EQ(dispatch(DispatchPolicy::kRoundRobin, c.input(), cursor), (std::vector<int32_t>{0, 2, 0, 2, 0, 2, 0}));
}

// Why: least load balances tokens: each request goes to the instance with the least load,
// counting the requests placed before it in the batch; ties go to the lower index.
TEST(Dispatch, LeastLoadPicksTheLeastLoaded) {
  Cluster c = idle(3, 4);
  c.load = {100, 50, 80};
  c.tokens = {40, 40, 40, 40};
  int64_t cursor = 0;
  // loads: {100, 50, 80} -> 1 (90) -> 2 (120) -> 1 (130) -> 0 (140)
  EXPECT_EQ(dispatch(DispatchPolicy::kLeastLoad, c.input(), cursor), (std::vector<int32_t>{1, 2, 1, 0}));
  c.load = {7, 7, 7};
  c.tokens = {1};
  c.blocks = {1};
  EXPECT_EQ(dispatch(DispatchPolicy::kLeastLoad, c.input(), cursor), (std::vector<int32_t>{0}));
  c.available = {0, 1, 1};
  EXPECT_EQ(dispatch(DispatchPolicy::kLeastLoad, c.input(), cursor), (std::vector<int32_t>{1}));
}

// Why: headroom routes by the estimator's prediction; each placement uses up its blocks.
TEST(Dispatch, HeadroomPicksTheMostHeadroom) {
  Cluster c = idle(3, 3);
  c.headroom = {30, 50, 45};
  c.blocks = {10, 10, 10};
  int64_t cursor = 0;
  // {30, 50, 45} -> 1 (40) -> 2 (35) -> 1 (30)
  EXPECT_EQ(dispatch(DispatchPolicy::kHeadroom, c.input(), cursor), (std::vector<int32_t>{1, 2, 1}));
}

// Why: prefix affinity follows cached prefixes, but not onto an instance loaded past the
// imbalance limit; with nothing cached it is least load.
TEST(Dispatch, PrefixAffinityFollowsHitsWithinTheImbalanceLimit) {
  Cluster c = idle(3, 2);
  c.load = {0, 500, 2000};
  c.capacity = {10000, 10000, 10000};
  c.hits = {0, 4, 9,   // request 0: most hits on 2, but 2 is 2000 tokens over the lightest (> 1000)
            0, 0, 0};  // request 1: nothing cached anywhere
  int64_t cursor = 0;
  EXPECT_EQ(dispatch(DispatchPolicy::kPrefixAffinity, c.input(0.1), cursor), (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(dispatch(DispatchPolicy::kPrefixAffinity, c.input(0.5), cursor), (std::vector<int32_t>{2, 0}));
}

// Why: with a global queue, a request that fits nowhere and every one after it wait at the
// dispatcher (first come, first served) instead of in one instance's queue.
TEST(Dispatch, GlobalQueueHoldsWhatFitsNowhere) {
  Cluster c = idle(2, 3);
  c.load = {10, 10};
  c.headroom = {15, 8};
  c.blocks = {10, 10, 1};
  int64_t cursor = 0;
  // Request 0 takes instance 0's room (5 left); request 1 fits nowhere; request 2 would fit but
  // is held behind it.
  EXPECT_EQ(dispatch(DispatchPolicy::kHeadroom, c.input(0.1, true), cursor), (std::vector<int32_t>{0, -1, -1}));
  c.headroom = {5, 5};
  EXPECT_EQ(dispatch(DispatchPolicy::kHeadroom, c.input(0.1, true), cursor), (std::vector<int32_t>{-1, -1, -1}));
  c.load = {0, 10};  // an instance with nothing live takes a request whatever its headroom
  EXPECT_EQ(dispatch(DispatchPolicy::kLeastLoad, c.input(0.1, true), cursor), (std::vector<int32_t>{0, -1, -1}));
}

// Why: bad input throws std::invalid_argument before anything is decided (the cursor included).
TEST(Dispatch, BadInputThrows) {
  Cluster c = idle(2, 2);
  int64_t cursor = 1;
  DispatchInput none = c.input();
  none.num_instances = 0;
  EXPECT_THROW(dispatch(DispatchPolicy::kLeastLoad, none, cursor), std::invalid_argument);
  DispatchInput missing = c.input();
  missing.load_tokens = nullptr;
  EXPECT_THROW(dispatch(DispatchPolicy::kLeastLoad, missing, cursor), std::invalid_argument);
  EXPECT_THROW(dispatch(DispatchPolicy::kPrefixAffinity, c.input(), cursor), std::invalid_argument);  // no hits
  EXPECT_THROW(dispatch(DispatchPolicy::kLeastLoad, c.input(-1.0), cursor), std::invalid_argument);
  Cluster down = c;
  down.available = {0, 0};
  EXPECT_THROW(dispatch(DispatchPolicy::kRoundRobin, down.input(), cursor), std::invalid_argument);
  Cluster negative = c;
  negative.tokens[1] = -1;
  EXPECT_THROW(dispatch(DispatchPolicy::kRoundRobin, negative.input(), cursor), std::invalid_argument);
  // A policy value outside the enum (the C++ API takes the enum; a cast can make any value).
  EXPECT_THROW(dispatch(static_cast<DispatchPolicy>(7), c.input(), cursor), std::invalid_argument);
  EXPECT_EQ(cursor, 1);
}

}  // namespace
}  // namespace kvsched
