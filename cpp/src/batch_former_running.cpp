// The running stage of a step (BatchFormer::schedule_running): every running request's tokens for
// this step, stall-free (Sarathi-Serve). Two passes over the running list in key order:
//
//   1. decodes: every request whose next token is a decode gets it (plus lookahead slots) before any
//      prefill chunk takes budget;
//   2. prefill chunks (a new prompt's rest or a recompute), each at most max_prefill_chunk tokens,
//      share what is left of the budget, in key order, and shrink deep in long prompts so that the
//      step's prefill attention stays within prefill_attention_budget (which bounds the step
//      time, and so the gap every running decode sees).
//
// A request that cannot get its blocks preempts the back of the running list until it can (or it
// is the back itself). A victim placed earlier in the step (a decode with a larger key than a
// prefill of pass 2) loses its row and its tokens go back to the budget: the only ways a running
// decode misses a step are being preempted, which the plan reports, and max_num_seqs. The plan's
// rows are the decodes in running order, then the prefill chunks in running order.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kvsched/batch_former.h"
#include "kvsched/errors.h"
#include "kvsched/limits.h"

namespace kvsched {

int64_t BatchFormer::prefill_tokens(int64_t context, int64_t missing, int64_t budget) const {
  const int64_t chunk = options_.max_prefill_chunk > 0 ? options_.max_prefill_chunk : budget;
  int64_t n = std::min({missing, chunk, budget});
  if (n <= 0 || step_attention_left_ == std::numeric_limits<int64_t>::max()) return n;
  // The largest n with n * (2 * context + n) <= 2 * left, in 128 bits: a budget near int64's
  // limit doubled, or a long context times a large chunk, would wrap in 64.
  using Wide = Int128;
  const double c = static_cast<double>(context), left = static_cast<double>(step_attention_left_);
  auto fits = static_cast<int64_t>(std::min(std::floor(std::sqrt(c * c + 2.0 * left) - c), static_cast<double>(n)));
  auto cost = [context](int64_t k) { return Wide{k} * (Wide{2} * context + k); };
  while (fits > 0 && cost(fits) > Wide{2} * step_attention_left_) --fits;
  n = std::min(n, fits);
  return step_has_prefill_ ? n : std::max<int64_t>(n, std::min<int64_t>(1, std::min(missing, budget)));
}

void BatchFormer::charge_prefill(int64_t context, int64_t n) {
  step_has_prefill_ = true;
  if (step_attention_left_ == std::numeric_limits<int64_t>::max()) return;
  const Int128 pairs = Int128{n} * (Int128{2} * context + n) / 2;
  step_attention_left_ = pairs >= step_attention_left_ ? 0 : static_cast<int64_t>(step_attention_left_ - pairs);
}

bool BatchFormer::place_running(Request& r, int64_t n, int64_t& budget, bool& preempted_for_memory) {
  const int64_t needed = r.num_computed + n;
  while (!allocator_.can_allocate(r.id, needed)) {
    Request& victim = *running_.back();
    running_.pop_back();
    if (victim.scheduled >= 0) budget += unemit(victim);  // placed earlier in this step
    step_preempted_tokens_ += victim.num_computed;  // before preempt(): a recompute zeroes it
    preempt(victim);
    preempted_for_memory = true;
    ++step_memory_preemptions_;
    if (&victim == &r) return false;
  }
  scratch_blocks_.clear();
  allocator_.allocate(r.id, needed, r.keys.data(), r.keys.size(), scratch_blocks_);
  emit(r, n, scratch_blocks_.data(), scratch_blocks_.size());
  budget -= n;
  return true;
}

int64_t BatchFormer::unemit(Request& r) {
  // Rare (a prefill of pass 2 with a smaller key evicts a decode of pass 1): a linear erase.
  size_t row = plan_.req_ids.size();
  while (row > 0 && plan_.req_ids[row - 1] != r.id) --row;
  KVSCHED_ASSERT(row > 0, "request ", r.id, " is scheduled but has no row in the plan");
  --row;
  const int64_t tokens = plan_.num_tokens[row];
  auto erase = [row](auto& column) { column.erase(column.begin() + static_cast<std::ptrdiff_t>(row)); };
  erase(plan_.req_ids);
  erase(plan_.client_ids);
  erase(plan_.num_tokens);
  erase(plan_.computed_offsets);
  erase(plan_.num_generated);
  erase(plan_.is_prefill);
  erase(plan_.prompt_lens);
  erase(plan_.samples);
  const int64_t begin = plan_.block_indptr[row], end = plan_.block_indptr[row + 1];
  plan_.new_blocks.erase(plan_.new_blocks.begin() + begin, plan_.new_blocks.begin() + end);
  plan_.block_indptr.erase(plan_.block_indptr.begin() + static_cast<std::ptrdiff_t>(row) + 1);
  for (size_t i = row + 1; i < plan_.block_indptr.size(); ++i) plan_.block_indptr[i] -= end - begin;
  r.scheduled = -1;
  return tokens;
}

void BatchFormer::schedule_running(int64_t& budget, bool& preempted_for_memory) {
  const bool lookahead_on = options_.num_lookahead_tokens > 0;
  int64_t decodes_left = 0;  // behind the current one: each needs one token of the budget
  if (lookahead_on) {
    for (const Request* r : running_) decodes_left += r->total() - r->num_computed == 1 ? 1 : 0;
  }
  // Pass 1: decodes. running_ shrinks from the back when someone is preempted.
  bool any_prefill = false;
  for (size_t i = 0; i < running_.size(); ++i) {
    Request& r = *running_[i];
    if (r.total() - r.num_computed != 1) {
      any_prefill = true;
      continue;
    }
    int64_t n = 1;
    if (lookahead_on) {
      // Lookahead slots for speculative decoding stay within max_new_tokens and never take the token
      // of a decode behind (max_num_batched_tokens >= max_num_seqs leaves one for each).
      --decodes_left;
      int64_t lookahead = std::min<int64_t>(options_.num_lookahead_tokens, r.max_new_tokens - r.num_generated - 1);
      n += std::max<int64_t>(0, std::min(lookahead, budget - 1 - decodes_left));
    }
    if (!place_running(r, n, budget, preempted_for_memory)) break;  // r and all behind it are out
  }
  if (!any_prefill) return;
  // Pass 2: prefill chunks in what is left.
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Request& r = *running_[i];
    const int64_t missing = r.total() - r.num_computed;
    if (missing <= 1) continue;
    const int64_t n = prefill_tokens(r.num_computed, missing, budget);
    if (n <= 0) continue;  // the step's attention budget is spent: it goes on next step
    const int64_t context = r.num_computed;
    if (!place_running(r, n, budget, preempted_for_memory)) break;
    charge_prefill(context, n);
  }
}

}  // namespace kvsched
