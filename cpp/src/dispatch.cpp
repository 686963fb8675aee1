#include "kvsched/dispatch.h"

#include <algorithm>
#include <stdexcept>

#include "kvsched/errors.h"

namespace kvsched {

std::vector<int32_t> dispatch(DispatchPolicy policy, const DispatchInput& in, int64_t& round_robin_next) {
  const size_t n = in.num_instances;
  // A value outside the enum would match no policy below and place requests on instance n.
  const int policy_value = static_cast<int>(policy);
  KVSCHED_EXPECTS(policy_value >= 0 && policy_value <= 3, std::invalid_argument, "policy must be in [0, 3], got ",
                  policy_value);
  KVSCHED_EXPECTS(n > 0, std::invalid_argument, "instances: at least one is needed");
  KVSCHED_EXPECTS(in.available && in.load_tokens && in.headroom_blocks && in.capacity_tokens, std::invalid_argument,
                  "available, load_tokens, headroom_blocks and capacity_tokens are required");
  KVSCHED_EXPECTS(in.num_requests == 0 || (in.request_tokens && in.request_blocks), std::invalid_argument,
                  "request_tokens and request_blocks are required");
  KVSCHED_EXPECTS(policy != DispatchPolicy::kPrefixAffinity || in.num_requests == 0 || in.prefix_hits,
                  std::invalid_argument, "prefix_hits is required by prefix affinity");
  KVSCHED_EXPECTS(in.imbalance_limit >= 0, std::invalid_argument, "imbalance_limit must be >= 0, got ",
                  in.imbalance_limit);
  bool any = false;
  for (size_t i = 0; i < n; ++i) any = any || in.available[i];
  KVSCHED_EXPECTS(any || in.num_requests == 0, std::invalid_argument, "available: no instance takes requests");
  for (size_t r = 0; r < in.num_requests; ++r) {
    KVSCHED_EXPECTS(in.request_tokens[r] >= 0 && in.request_blocks[r] >= 0, std::invalid_argument, "request_tokens[",
                    r, "] and request_blocks[", r, "] must be >= 0");
  }
  std::vector<int64_t> load(in.load_tokens, in.load_tokens + n), headroom(in.headroom_blocks, in.headroom_blocks + n);
  std::vector<int32_t> placed(in.num_requests, -1);
  std::vector<uint8_t> candidate(n);
  // Load as a share of the instance's KV capacity: in a fleet of unequal instances a large one
  // takes proportionally more (with equal capacities, the same order as the load in tokens).
  auto share = [&](size_t i) {
    return static_cast<long double>(load[i]) / static_cast<long double>(std::max<int64_t>(in.capacity_tokens[i], 1));
  };
  auto least_loaded = [&]() {
    size_t best = n;
    for (size_t i = 0; i < n; ++i) {
      if (candidate[i] && (best == n || share(i) < share(best))) best = i;
    }
    return best;
  };
  for (size_t r = 0; r < in.num_requests; ++r) {
    bool any_candidate = false;
    for (size_t i = 0; i < n; ++i) {
      candidate[i] = in.available[i] &&
                     (!in.global_queue || headroom[i] >= in.request_blocks[r] || load[i] == 0);
      any_candidate = any_candidate || candidate[i];
    }
    if (!any_candidate) break;  // held: this one and the rest of the batch wait at the dispatcher
    size_t best = n;
    switch (policy) {
      case DispatchPolicy::kRoundRobin:
        for (size_t k = 0; k < n && best == n; ++k) {
          size_t i = static_cast<size_t>((round_robin_next + static_cast<int64_t>(k)) % static_cast<int64_t>(n));
          if (candidate[i]) best = i;
        }
        round_robin_next = static_cast<int64_t>((best + 1) % n);
        break;
      case DispatchPolicy::kLeastLoad: best = least_loaded(); break;
      case DispatchPolicy::kHeadroom:
        for (size_t i = 0; i < n; ++i) {
          if (!candidate[i]) continue;
          // Equal headroom (e.g. all idle): the lighter load, so that queues stay short too.
          if (best == n || headroom[i] > headroom[best] || (headroom[i] == headroom[best] && share(i) < share(best))) {
            best = i;
          }
        }
        break;
      case DispatchPolicy::kPrefixAffinity: {
        const size_t lightest = least_loaded();
        const int64_t* hits = in.prefix_hits + r * n;
        best = lightest;
        for (size_t i = 0; i < n; ++i) {
          if (!candidate[i]) continue;
          if (share(i) - share(lightest) > static_cast<long double>(in.imbalance_limit)) continue;
          if (hits[i] > hits[best] || (hits[i] == hits[best] && share(i) < share(best))) best = i;
        }
        break;
      }
    }
    placed[r] = static_cast<int32_t>(best);
    load[best] += in.request_tokens[r];
    headroom[best] -= in.request_blocks[r];
  }
  return placed;
}

}  // namespace kvsched
