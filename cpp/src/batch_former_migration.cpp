// Cluster support of the batch former: the load report a dispatcher reads, prefix hits per
// instance, and both ends of a live migration (Llumnix-style: the destination reserves blocks
// stage by stage while the source keeps decoding; the last stage moves the request).
#include <algorithm>
#include <limits>

#include "kvsched/batch_former.h"
#include "kvsched/errors.h"
#include "kvsched/limits.h"

namespace kvsched {
namespace {
constexpr size_t kNoIndex = static_cast<size_t>(-1);  // lookup(): a single id, not an array entry
}  // namespace

void BatchFormer::push_holders(EstimatorInput& input) const {
  for (const Request* r : running_) input.push(*r);
  for (const Request* r : incoming_) input.push(*r);
}

void BatchFormer::expect_between_steps(const char* call) const {
  KVSCHED_EXPECTS(!plan_outstanding_, std::invalid_argument, call,
                  ": a plan is outstanding (call it between update() and schedule())");
}

InstanceLoad BatchFormer::load() {
  std::lock_guard<std::mutex> lock(mutex_);
  InstanceLoad load;
  load.num_running = static_cast<int64_t>(running_.size());
  load.num_waiting = static_cast<int64_t>(waiting_.size());
  load.num_swapped = static_cast<int64_t>(swapped_.size());
  load.num_incoming = static_cast<int64_t>(incoming_.size());
  load.capacity_blocks = estimator_capacity();
  load.used_blocks = allocator_.stats().num_used;
  running_input_.clear();
  push_holders(running_input_);
  const size_t holders = running_input_.held.size();
  for (size_t i = 0; i < holders; ++i) load.running_tokens += running_input_.held[i];
  for (const Request* r : swapped_) running_input_.push(*r);
  for (const Request* r : waiting_) running_input_.push(*r);
  for (size_t i = holders; i < running_input_.held.size(); ++i) load.queued_tokens += running_input_.held[i];
  if (running_input_.held.empty()) return load;
  const AdmissionMode mode =
      options_.admission == AdmissionMode::kAggressive ? AdmissionMode::kPastFuture : options_.admission;
  // Peaks as admission sees them (over its scenarios): of the running requests, of every live
  // one, and of the running ones plus the head of the queue (queued in the order they come back:
  // swapped, then waiting), whose difference is the head's predicted blocks.
  const size_t live = running_input_.held.size();
  const size_t prefixes[3] = {holders, live, std::min(holders + 1, live)};
  int64_t peaks[3];
  estimator_.admission_peaks(mode, running_input_.view(0), prefixes, 3, peaks);
  load.peak_blocks = peaks[0];
  load.demand_blocks = peaks[1];
  if (live > holders) load.head_blocks = std::max<int64_t>(0, peaks[2] - peaks[0]);
  return load;
}

void BatchFormer::record_output_lengths(const int64_t* lengths, const int32_t* class_ids, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  estimator_.record(lengths, class_ids, count);  // checks every value before recording any
}

std::vector<int64_t> BatchFormer::prefix_hits(const std::vector<Hash128>* keys, size_t count) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int64_t> hits(count, 0);
  if (!options_.allocator.enable_prefix_caching) return hits;
  std::vector<BlockId> found;
  for (size_t i = 0; i < count; ++i) {
    found.clear();
    allocator_.match_prefix(keys[i].data(), keys[i].size(), found);
    hits[i] = static_cast<int64_t>(found.size());
  }
  return hits;
}

RequestId BatchFormer::migration_candidate(const RequestId* exclude, size_t count) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Request* best = nullptr;
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {  // ties: the back of the running order
    const Request* r = *it;
    if (r->num_computed + 1 < r->total()) continue;  // still in prefill: it moves cheaper later
    if (std::find(exclude, exclude + count, r->id) != exclude + count) continue;
    if (best == nullptr || r->num_computed < best->num_computed) best = r;
  }
  return best ? best->id : -1;
}

int64_t BatchFormer::reserve_incoming(const NewRequest& n, int64_t num_generated, int64_t num_tokens,
                                      const std::vector<Hash128>* keys, std::vector<BlockId>& table) {
  std::lock_guard<std::mutex> lock(mutex_);
  expect_between_steps("reserve_incoming");
  const int64_t capacity_tokens = int64_t{options_.allocator.num_blocks} * options_.allocator.block_size;
  KVSCHED_EXPECTS(n.id >= 0, std::invalid_argument, "req_id must be >= 0, got ", n.id);
  KVSCHED_EXPECTS(!requests_.find(n.id), std::invalid_argument, "req_id: request ", n.id, " already exists");
  KVSCHED_EXPECTS(n.prompt_len > 0 && n.prompt_len <= kMaxRequestTokens, std::invalid_argument,
                  "prompt_len must be in [1, ", kMaxRequestTokens, "], got ", n.prompt_len);
  KVSCHED_EXPECTS(n.max_new_tokens > 0 && n.max_new_tokens <= kMaxRequestTokens, std::invalid_argument,
                  "max_new_tokens must be in [1, ", kMaxRequestTokens, "], got ", n.max_new_tokens);
  KVSCHED_EXPECTS(n.true_output_len == -1 || (n.true_output_len > 0 && n.true_output_len <= kMaxRequestTokens),
                  std::invalid_argument, "true_output_len must be in [1, ", kMaxRequestTokens,
                  "] or None, got ", n.true_output_len);
  KVSCHED_EXPECTS(num_generated >= 0 && num_generated < n.max_new_tokens, std::invalid_argument,
                  "num_generated must be in [0, max_new_tokens), got ", num_generated);
  // The last token's KV is computed where the request runs next (its decode needs the logits).
  KVSCHED_EXPECTS(num_tokens > 0 && num_tokens < n.prompt_len + num_generated, std::invalid_argument,
                  "num_tokens must be in [1, prompt_len + num_generated - 1], got ", num_tokens);
  KVSCHED_EXPECTS(n.prompt_len + n.max_new_tokens <= capacity_tokens, std::invalid_argument,
                  "prompt_len + max_new_tokens (", n.prompt_len + n.max_new_tokens,
                  ") exceed this instance's KV capacity (", capacity_tokens, " tokens)");
  KVSCHED_EXPECTS(std::isfinite(n.arrival_time) && std::isfinite(n.key), std::invalid_argument,
                  "arrival_time and key must be finite");
  KVSCHED_EXPECTS(n.class_id >= 0 && n.client_id >= 0 && n.lora_id >= 0, std::invalid_argument,
                  "class_id, client_id and lora_id must be >= 0");
  if (static_cast<int64_t>(running_.size() + incoming_.size()) >= options_.max_num_seqs) {
    throw OutOfBlocks(detail::concat("reserve_incoming: no sequence slot (max_num_seqs ", options_.max_num_seqs,
                                     ")"));
  }
  collect_active_loras();
  if (!lora_slot(n.lora_id)) {
    throw OutOfBlocks(detail::concat("reserve_incoming: no LoRA slot for lora_id ", n.lora_id, " (max_loras ",
                                     options_.max_loras, ")"));
  }
  // Only the blocks already cached here are shared: the rest are registered at commit, once the
  // copy has filled them, so that no request here reads one before its KV arrives.
  const bool cache = keys != nullptr && !keys->empty() && options_.allocator.enable_prefix_caching;
  scratch_blocks_.clear();
  if (cache) allocator_.match_prefix(keys->data(), keys->size(), scratch_blocks_);
  const size_t num_hits = scratch_blocks_.size();
  scratch_blocks_.clear();
  allocator_.allocate(n.id, num_tokens, cache ? keys->data() : nullptr, num_hits, scratch_blocks_);  // or OutOfBlocks
  // The copy overwrites the blocks this reservation evicted from the prefix cache before the next
  // plan could write them back: the host tier forgets them instead.
  if (options_.host_prefix_cache) allocator_.pop_evictions(evictions_);
  evictions_.clear();
  Request& r = *requests_.try_emplace(n.id).first;
  r.id = n.id;
  r.prompt_len = n.prompt_len;
  r.max_new_tokens = n.max_new_tokens;
  r.true_output_len = n.true_output_len < 0 ? -1 : std::min(n.true_output_len, n.max_new_tokens);
  r.num_generated = num_generated;
  r.num_computed = num_tokens;
  r.arrival = n.arrival_time;
  r.key = n.key;
  r.class_id = n.class_id;
  r.client_id = n.client_id;
  r.lora_id = n.lora_id;
  r.add_order = next_add_order_++;
  r.state = RequestState::kIncoming;
  if (cache) r.keys.assign(keys->begin(), keys->end());
  incoming_.push_back(&r);
  table_scratch_ = allocator_.block_table(n.id);
  table.insert(table.end(), table_scratch_.begin(), table_scratch_.end());
  return allocator_.num_cached_tokens(n.id);
}

void BatchFormer::extend_incoming(RequestId id, int64_t num_tokens, int64_t num_generated,
                                  std::vector<BlockId>& added) {
  std::lock_guard<std::mutex> lock(mutex_);
  expect_between_steps("extend_incoming");
  Request& r = lookup(id, "req_id", kNoIndex);
  KVSCHED_EXPECTS(r.state == RequestState::kIncoming, std::invalid_argument, "req_id: request ", id, " is ",
                  request_state_name(r.state), ", not incoming");
  KVSCHED_EXPECTS(num_generated >= r.num_generated && num_generated < r.max_new_tokens, std::invalid_argument,
                  "num_generated must be in [", r.num_generated, ", ", r.max_new_tokens, "), got ", num_generated);
  // As at reservation: the last token's KV is computed where the request runs next.
  KVSCHED_EXPECTS(num_tokens >= r.num_computed && num_tokens < r.prompt_len + num_generated, std::invalid_argument,
                  "num_tokens must be in [", r.num_computed, ", ", r.prompt_len + num_generated - 1, "], got ",
                  num_tokens);
  scratch_blocks_.clear();
  allocator_.allocate(id, num_tokens, nullptr, 0, scratch_blocks_);
  if (options_.host_prefix_cache) allocator_.pop_evictions(evictions_);
  evictions_.clear();
  r.num_computed = num_tokens;
  r.num_generated = num_generated;  // the estimator counts what it holds by the end of this stage
  added.insert(added.end(), scratch_blocks_.begin(), scratch_blocks_.end());
}

void BatchFormer::commit_incoming(RequestId id, int64_t num_generated) {
  std::lock_guard<std::mutex> lock(mutex_);
  expect_between_steps("commit_incoming");
  Request& r = lookup(id, "req_id", kNoIndex);
  KVSCHED_EXPECTS(r.state == RequestState::kIncoming, std::invalid_argument, "req_id: request ", id, " is ",
                  request_state_name(r.state), ", not incoming");
  KVSCHED_EXPECTS(num_generated >= r.num_generated && num_generated < r.max_new_tokens &&
                      r.prompt_len + num_generated > r.num_computed,
                  std::invalid_argument, "num_generated must be in [", r.num_generated, ", ", r.max_new_tokens,
                  ") and leave a token past the ", r.num_computed, " reserved ones to compute, got ", num_generated);
  r.num_generated = num_generated;
  if (!r.keys.empty()) {  // its KV has arrived: its full blocks join the prefix cache
    scratch_blocks_.clear();
    allocator_.allocate(id, r.num_computed, r.keys.data(), r.keys.size(), scratch_blocks_);
  }
  incoming_.erase(std::find(incoming_.begin(), incoming_.end(), &r));
  r.state = RequestState::kRunning;
  r.admit_order = next_admit_order_++;
  running_.push_back(&r);
  running_sorted_ = false;
  ++counters_.migrated_in;
}

void BatchFormer::expect_distinct_in_state(const RequestId* ids, size_t count, RequestState state,
                                           const char* refusal) const {
  check_distinct_live(ids, count);
  for (size_t i = 0; i < count; ++i) {
    const Request& r = lookup(ids[i], "req_ids", i);
    KVSCHED_EXPECTS(r.state == state, std::invalid_argument, "req_ids[", i, "]: request ", ids[i], " is ",
                    request_state_name(r.state), refusal);
  }
}

void BatchFormer::cancel_incoming(const RequestId* ids, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  expect_between_steps("cancel_incoming");
  expect_distinct_in_state(ids, count, RequestState::kIncoming, ", not incoming");
  for (size_t i = 0; i < count; ++i) remove(lookup(ids[i], "req_ids", i));
}

void BatchFormer::migrate_out(const RequestId* ids, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  expect_between_steps("migrate_out");
  expect_distinct_in_state(ids, count, RequestState::kRunning, "; only running requests migrate");
  for (size_t i = 0; i < count; ++i) {
    remove(lookup(ids[i], "req_ids", i));
    ++counters_.migrated_out;
  }
}

}  // namespace kvsched
