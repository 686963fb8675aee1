// Preemption: how a running request leaves the device (by swap to host or by recompute), and the
// priority preemption that makes room for a waiting request with a smaller key. The victim is
// always the back of the running list (batch_former.h: lowest priority, then newest).
#include "kvsched/batch_former.h"

#include <algorithm>

#include "kvsched/errors.h"

namespace kvsched {

bool BatchFormer::should_swap(const Request& r) const {
  // The planner also exists for the host tier alone: recompute mode never swaps.
  if (options_.preemption == PreemptionMode::kRecompute || !swap_planner_ || r.num_computed == 0 ||
      !swap_planner_->can_swap_out(r.id, r.num_computed)) {
    return false;
  }
  if (options_.preemption == PreemptionMode::kSwap) return true;
  double recompute = static_cast<double>(r.num_computed) * options_.recompute_seconds_per_token;
  return swap_planner_->estimate_round_trip_seconds(r.id, r.num_computed) < recompute;
}

void BatchFormer::swap_out(Request& r) {
  scratch_blocks_ = allocator_.block_table(r.id);
  const int64_t indptr[2] = {0, static_cast<int64_t>(scratch_blocks_.size())};
  SwapPlan swap = swap_planner_->plan_swap_out(&r.id, &r.num_computed, indptr, scratch_blocks_.data(), 1);
  append_swap(swap, plan_.swapped_out_ids, plan_.swap_out_indptr, plan_.swap_out, plan_.swap_out_descriptors,
              plan_.swap_out_bytes);
  allocator_.free(r.id);
  r.state = RequestState::kSwapped;
  r.bypassed = 0;
  r.preempted_at_step = counters_.steps;
  ++r.num_preemptions;
  swapped_.insert(&r);
}

void BatchFormer::preempt(Request& r) {
  if (should_swap(r)) {
    swap_out(r);
    return;
  }
  preempt_by_recompute(r);
  plan_.preempted_ids.push_back(r.id);
}

void BatchFormer::preempt_by_recompute(Request& r) {
  // A host copy kept from an earlier swap would be stale once the KV is rebuilt.
  if (swap_planner_) swap_planner_->release(&r.id, 1);
  allocator_.free(r.id);
  r.num_computed = 0;  // prompt and generated tokens are prefilled again on return
  r.state = RequestState::kWaiting;
  r.bypassed = 0;
  r.preempted_at_step = counters_.steps;  // it sits out the rest of this step (and the next
                                          // schedule() when preempted between steps)
  ++r.num_preemptions;
  waiting_.insert(&r);
}

void BatchFormer::recompute(const RequestId* ids, const int64_t* num_generated, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  expect_between_steps("recompute");
  check_distinct_settled(ids, count, "recompute");
  for (size_t i = 0; i < count; ++i) {
    const Request& r = lookup(ids[i], "req_ids", i);
    KVSCHED_EXPECTS(num_generated[i] >= 0 && num_generated[i] <= r.num_generated, std::invalid_argument,
                    "num_generated[", i, "]: request ", r.id, " has generated ", r.num_generated,
                    " tokens, so it is between 0 and that; got ", num_generated[i]);
  }
  for (size_t i = 0; i < count; ++i) {
    Request& r = lookup(ids[i], "req_ids", i);
    switch (r.state) {
      case RequestState::kRunning:
        running_.erase(std::find(running_.begin(), running_.end(), &r));
        preempt_by_recompute(r);
        break;
      case RequestState::kSwapped:  // its host copy is dropped: it comes back by recompute
        swapped_.erase(&r);
        swap_planner_->release(&r.id, 1);
        r.num_computed = 0;
        r.state = RequestState::kWaiting;
        r.bypassed = 0;
        r.preempted_at_step = counters_.steps;
        waiting_.insert(&r);
        break;
      case RequestState::kWaiting:  // its device KV is already gone; a host copy kept for reuse goes too
        if (swap_planner_) swap_planner_->release(&r.id, 1);
        r.num_computed = 0;
        r.preempted_at_step = counters_.steps;
        break;
      case RequestState::kIncoming:
        break;  // refused above
    }
    r.num_generated = num_generated[i];
  }
}

void BatchFormer::preempt_for_priority() {
  // A waiting request with a strictly smaller key than the back of the running list takes its
  // place when it cannot be admitted otherwise (no slot, or the estimator says it does not fit).
  while (!waiting_.empty() && !running_.empty()) {
    Request& head = **waiting_.begin();
    Request& worst = *running_.back();
    if (!(head.key < worst.key)) return;
    bool has_slot = static_cast<int64_t>(running_.size() + incoming_.size()) < options_.max_num_seqs;
    if (has_slot) {
      running_input_.clear();
      push_holders(running_input_);
      candidate_input_.clear();
      candidate_input_.push(head);
      if (estimator_.admit(options_.admission, running_input_.view(0), candidate_input_.view(0),
                           estimator_capacity(), 0) == 1) {
        return;
      }
    }
    running_.pop_back();
    preempt(worst);
    ++counters_.priority_preemptions;
  }
}

}  // namespace kvsched
