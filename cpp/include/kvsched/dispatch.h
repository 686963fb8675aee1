// Cluster dispatch: places a batch of new requests on engine instances in one call.
//
// Glossary
//   instance   one engine with its own batch former; the dispatcher sees it through a few numbers
//              per instance (InstanceLoad, batch_former.h), gathered once per batch.
//   load       tokens of an instance's live requests, running and queued: what least-load routers
//              balance today. Compared as a share of the instance's KV capacity, so that in a fleet
//              of unequal instances a large one takes proportionally more.
//   headroom   KV blocks an instance has left after the predicted future peak of every live
//              request (capacity - demand_blocks); negative when it will have to preempt or queue.
//   affinity   leading prompt blocks of a request already cached on an instance.
//
// Policies (DispatchPolicy): round robin; least load; headroom (the most headroom, the estimator's
// prediction of what each instance will need); prefix affinity (the most cached blocks among the
// instances whose load share is within `imbalance_limit` of the least loaded one's; least load
// when nothing is cached). Requests are placed in order, each seeing what the earlier ones of the
// batch added (load += its tokens, headroom -= its predicted blocks). Ties go to the lower index.
// With `global_queue`, only instances with room for a request are candidates (headroom at least
// its predicted blocks, or nothing live at all): a request that fits nowhere, and every one after
// it in the batch (first come, first served), is not placed (-1) and waits at the dispatcher for
// the first instance that frees room, instead of in one instance's queue.
// Errors: bad input throws std::invalid_argument naming the argument, before anything is decided.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvsched {

enum class DispatchPolicy : int { kRoundRobin = 0, kLeastLoad = 1, kHeadroom = 2, kPrefixAffinity = 3 };

struct DispatchInput {
  size_t num_instances = 0, num_requests = 0;
  const uint8_t* available = nullptr;        // [instance] 1: takes new requests (alive, not draining)
  const int64_t* load_tokens = nullptr;      // [instance]
  const int64_t* headroom_blocks = nullptr;  // [instance]
  const int64_t* capacity_tokens = nullptr;  // [instance] KV capacity: loads are compared as shares of it
  const int64_t* request_tokens = nullptr;   // [request] tokens it adds to the load (prompt + expected output)
  const int64_t* request_blocks = nullptr;   // [request] blocks it adds to the predicted peak
  const int64_t* prefix_hits = nullptr;      // [request][instance], row-major; prefix affinity only
  double imbalance_limit = 0.1;
  bool global_queue = false;
};

// The instance of each request (-1: held, with global_queue); `round_robin_next` is the cursor,
// read and advanced.
std::vector<int32_t> dispatch(DispatchPolicy policy, const DispatchInput& input, int64_t& round_robin_next);

}  // namespace kvsched
