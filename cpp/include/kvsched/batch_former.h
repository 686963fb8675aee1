// The batch former: one call per engine step decides which requests run, how many tokens each
// computes, which KV blocks they get and who is preempted.
//
// Glossary
//   request    an int64 id with a prompt of `prompt_len` tokens that will generate at most
//              `max_new_tokens` tokens. total = prompt_len + generated tokens.
//   computed   tokens whose KV is in the cache. A step schedules `total - computed` tokens for a
//              request (a prefill, possibly chunked, or a recompute after preemption) or exactly one
//              (a decode; plus lookahead tokens for speculative decoding).
//   key        the policy's ordering key: smaller runs first. Ties go to the earlier arrival, then
//              to the earlier add. The waiting queue is ordered by key; the running list by key and
//              then admission order, so its back is the victim (lowest priority, then newest).
//   bypass     a waiting request that does not fit may be passed over by ones behind it that do,
//              at most `max_bypass` steps; after that admission waits for it (no starvation).
//              A preempted request that the estimator does not admit ends admission for the step:
//              the cache that evicted it is still full, and what fits behind it would be the next
//              victim. (One that sits out this step, or whose LoRA adapter has no slot, is not
//              a candidate and does not block; swapped requests come back by their own rule.)
//   plan       what schedule() returns; update() then reports what the engine generated for every
//              scheduled request. A plan is outstanding until update() consumes it.
//   swapped    a preempted request whose computed KV was moved to host memory (SwapPlanner); it
//              comes back with its KV instead of recomputing it.
//   host tier  with `host_prefix_cache`, full blocks evicted from the device prefix cache are
//              written back to the host pool (cache_write) and a new request's prefix is matched
//              on the device, then on the host: host hits are loaded into fresh device blocks
//              (cache_load) when the cost model says the copy beats recomputing them, and its
//              prefill starts after them.
//   LoRA       a request's adapter (lora_id > 0; 0 is the base model). With max_loras > 0 the
//              running and incoming requests use at most that many distinct adapters (what an
//              engine can hold at once): a waiting or swapped request of another adapter waits for
//              a slot, passed over by the requests behind it.
//   external   prompt tokens whose KV an engine's KV connector holds (vLLM's external prefix hits,
//              `external_tokens` at add): a request admitted with fewer computed tokens than that
//              (device hit, host tier) is admitted with them computed, in fresh blocks the engine's
//              connector loads before the plan's forward pass (the plan's external_load_ids and
//              external_load_tokens; inline, never prefetched).
//              Counted again if it is recomputed after a preemption.
//   incoming   a request migrating in from another instance (batch_former_migration.cpp): it
//              holds blocks reserved for the KV being copied to it but is in no queue; commit
//              makes it running with those tokens computed, cancel frees them. The estimator
//              counts it as running, so admission leaves room for it.
//
// Step order: running requests first (every decode, then ongoing prefill chunks in key order with
// at most max_prefill_chunk tokens each: batch_former_running.cpp), then
// swapped requests coming back (in key order, through the PeakEstimator), then new admissions
// through the PeakEstimator in key order, under max_num_batched_tokens and max_num_seqs; the last
// prefill is chunked to fit. New requests wait while a swapped one cannot come back. When a
// running request cannot get its next block, the back of the running list is preempted: by swap
// (its KV goes to host blocks) or by recompute (its blocks are freed and it waits again with its
// generated tokens kept), as `preemption` says; kAuto swaps when the SwapPlanner's cost model says
// the round trip is cheaper than prefilling the request's computed tokens again. Nothing is
// admitted or swapped in during a step that preempted for memory, and a preempted request never
// comes back in the step that preempted it (an asynchronous engine may still have its last token
// in flight; it is known by the step after).
//
// The engine executes a plan's copies before its forward pass, in this order: swap_out and
// cache_write (device blocks they read may be handed to others in the same plan), then swap_in and
// cache_load, then copy_on_writes.
//
// Prefix hits within a step: a block's key is registered when the block is allocated, not when its
// KV is computed, so a request admitted in a step may hit blocks that another row of the same plan
// computes in that forward pass. The engine must write every row's KV before any row's attention
// reads it (vLLM does, layer by layer); an engine that cannot must not share such blocks.
//
// Errors: every call checks all of its input before changing anything (errors.h).
// Thread safety: every public method takes an internal mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "kvsched/block_allocator.h"
#include "kvsched/detail/id_map.h"
#include "kvsched/peak_estimator.h"
#include "kvsched/swap_planner.h"

namespace kvsched {

using RequestId = int64_t;

enum class RequestState : int { kWaiting = 0, kRunning = 1, kSwapped = 2, kIncoming = 3 };
const char* request_state_name(RequestState state);
enum class RejectReason : int { kPromptTooLong = 1 };
enum class PreemptionMode : int { kRecompute = 0, kSwap = 1, kAuto = 2 };

struct BatchFormerOptions {
  BlockAllocatorOptions allocator;
  PeakEstimatorOptions estimator;  // block_size is set to the allocator's (the peak counts blocks)
  AdmissionMode admission = AdmissionMode::kPastFuture;
  int64_t max_num_batched_tokens = 8192;
  int32_t max_num_seqs = 256;
  int64_t max_prefill_chunk = 2048;  // prefill tokens per request per step; 0: only the step budget
  // Attention work of a step's prefill chunks, in token pairs: a chunk of n tokens after c computed
  // ones costs n * (c + n / 2). Deep in a long prompt a chunk's attention, not its size, sets the
  // step time (and so every running decode's gap): chunks shrink there to stay within this. The
  // default is what a full 2048-token chunk at 8k context costs, so contexts up to 8k are not
  // affected. 0: no limit. The first prefill of a step always gets at least one token.
  int64_t prefill_attention_budget = 2048 * (8192 + 1024);
  int32_t num_lookahead_tokens = 0;
  int32_t max_bypass = 16;
  int64_t watermark_blocks = 0;  // blocks admission leaves free
  bool preempt_for_priority = false;  // a waiting request with a smaller key may evict running ones
  PreemptionMode preemption = PreemptionMode::kRecompute;
  // Swap needs a host pool: swap.num_host_blocks > 0 (block_size is set to the allocator's).
  SwapPlannerOptions swap;
  // kAuto and the host tier: what recomputing one token costs (the engine's prefill time per token).
  double recompute_seconds_per_token = 1e-4;
  // The host tier of the prefix cache (needs swap.num_host_blocks > 0 and prefix caching), in any
  // preemption mode; swapped requests and cached blocks share the host pool. A finished request's
  // resident host copy (it was swapped) stays behind as cache, without a copy.
  bool host_prefix_cache = false;
  // Host tier, write-through: a finished request's full blocks are written to the host by the next
  // plan, where they may overlap its forward pass (cache_overlap_seconds), so that a later
  // eviction finds them there already. Off: a block is written back only when the device evicts it,
  // and the next forward pass, which reuses it, waits for that copy.
  bool host_cache_write_through = false;
  // Host tier, prefetch: a request whose prefix comes from the host is admitted with its load but
  // without a row; its prefill starts in the next plan, so the load overlaps this forward pass
  // instead of delaying it. Its first row then lists its whole block table as new blocks.
  bool host_cache_prefetch = false;
  // Distinct LoRA adapters (lora_id > 0) among running and incoming requests; 0: no limit.
  int32_t max_loras = 0;
};

// A request as add_requests() takes it; optional fields use -1 / empty.
struct NewRequest {
  RequestId id = -1;
  int64_t prompt_len = 0;
  int64_t max_new_tokens = 0;
  double arrival_time = 0.0;
  double key = 0.0;
  int32_t class_id = 0;          // the estimator keeps one output-length history per class
  int32_t client_id = 0;         // for per-client policy keys (fair share)
  int64_t true_output_len = -1;  // read by the oracle admission mode only
  int32_t lora_id = 0;           // 0: the base model (max_loras counts the others)
  int64_t external_tokens = 0;   // prompt tokens an engine's KV connector can load ("external")
};

// Flat arrays an engine consumes without per-request work in Python.
struct StepPlan {
  std::vector<int64_t> req_ids;
  std::vector<int32_t> client_ids;
  std::vector<int64_t> num_tokens;        // tokens to compute this step
  std::vector<int64_t> computed_offsets;  // tokens already in the cache before this step
  std::vector<int64_t> num_generated;     // tokens generated before this step (its sequence is
                                          // prompt_len + num_generated tokens long)
  std::vector<uint8_t> is_prefill;        // 1: prefill or recompute chunk, 0: decode
  std::vector<int64_t> prompt_lens;
  std::vector<uint8_t> samples;           // 1: the step reaches the end of the sequence and samples
                                          // a token (update() expects >= 1 token for it, else 0)
  std::vector<int64_t> block_indptr;      // new_blocks[block_indptr[i]:block_indptr[i+1]] for req i
  std::vector<int32_t> new_blocks;
  std::vector<int64_t> copy_on_writes;    // flat (req_id, src_block, dst_block) triples
  std::vector<int64_t> preempted_ids;     // preempted this step by recompute
  // Swaps, per request: ids, and their extents (flat (src_block, dst_block, n_blocks), rows
  // swap_*_indptr[i]..swap_*_indptr[i+1]) and byte descriptors (flat (tensor, src_offset,
  // dst_offset, nbytes); only with a KV layout). Out: device -> host; in: host -> device.
  std::vector<int64_t> swapped_out_ids, swap_out_indptr, swap_out, swap_out_descriptors;
  std::vector<int64_t> swapped_in_ids, swap_in_indptr, swap_in, swap_in_descriptors;
  int64_t swap_out_bytes = 0, swap_in_bytes = 0;
  // Host tier (flat (src_block, dst_block, n_blocks) extents and byte descriptors as above):
  // write-backs device -> host, run with swap_out; loads host -> device into the new blocks of
  // cache_load_ids (rows cache_load_indptr[i]..[i+1]), run with swap_in.
  std::vector<int64_t> cache_write, cache_write_descriptors;
  std::vector<int64_t> cache_load_ids, cache_load_indptr, cache_load, cache_load_descriptors;
  int64_t cache_write_bytes = 0, cache_load_bytes = 0;
  double swap_seconds = 0.0;  // cost-model estimate of every copy, both directions
  // The part of swap_seconds an engine may overlap with the forward pass: write-throughs of blocks
  // this plan does not hand to another request, and loads for requests without a row in it.
  double cache_overlap_seconds = 0.0;
  // External loads: requests admitted with tokens the engine's KV connector loads, and how many
  // (past what the device prefix cache and the host tier held). Run before the forward pass.
  std::vector<int64_t> external_load_ids, external_load_tokens;
  std::vector<int64_t> rejected_ids;
  std::vector<int32_t> rejected_reasons;  // RejectReason
  int64_t num_admitted = 0;

  void clear();
};

struct BatchFormerStats {
  int64_t num_waiting = 0;
  int64_t num_running = 0;
  int64_t num_swapped = 0;
  int64_t num_incoming = 0;  // migrating in, blocks reserved
  int64_t added = 0;
  int64_t migrated_in = 0;   // committed migrations in; added + migrated_in = finished + aborted
  int64_t migrated_out = 0;  //   + rejected + migrated_out + live (not incoming)
  int64_t finished = 0;
  int64_t aborted = 0;
  int64_t rejected = 0;
  int64_t admitted = 0;            // admissions, counting re-admissions after preemption
  int64_t preemptions = 0;         // for memory, by swap or recompute
  int64_t preempted_tokens = 0;    // computed tokens those preemptions' victims held: what a
                                   // recompute computes again, or a swap copies (admission's
                                   // priced risk reads it as a victim's size)
  // Swaps, read from the SwapPlanner's counters.
  int64_t swap_preemptions = 0;    // preemptions (counted above) that swapped
  int64_t swapped_in = 0;
  int64_t swap_out_bytes = 0, swap_in_bytes = 0;
  int64_t swap_blocks_reused = 0;  // blocks not copied: still valid on the host, or a prefix-cache hit
  // Host tier, read from the SwapPlanner's counters: blocks loaded (host prefix hits) and written back.
  int64_t host_hit_blocks = 0, cache_write_blocks = 0;
  int64_t cache_load_bytes = 0, cache_write_bytes = 0;
  int64_t priority_preemptions = 0;
  int64_t max_new_tokens_capped = 0;  // requests whose max_new_tokens was cut to what the cache holds
  int64_t steps = 0;
  int64_t scheduled_tokens = 0;
  double estimator_quantile = 0.0;
};

// What a cluster dispatcher reads of an instance in one call (load()). Blocks are those the
// estimator plans with (pinned and watermark blocks excluded); predictions use the instance's
// admission mode, except aggressive (which predicts no growth) reports past_future's.
struct InstanceLoad {
  int64_t num_running = 0, num_waiting = 0, num_swapped = 0, num_incoming = 0;
  int64_t running_tokens = 0;  // tokens of running and incoming requests (prompt + generated)
  int64_t queued_tokens = 0;   // tokens of waiting and swapped requests
  int64_t capacity_blocks = 0;
  int64_t used_blocks = 0;     // held by sequences now
  int64_t peak_blocks = 0;     // predicted future peak of running and incoming requests
  int64_t demand_blocks = 0;   // predicted future peak of every live request, queued ones included
  int64_t head_blocks = 0;     // what the next queued request adds to peak_blocks (0: none queued)
};

struct RequestInfo {
  RequestState state;
  int64_t prompt_len, max_new_tokens, num_computed, num_generated, num_preemptions;
  double key;
};

class BatchFormer {
 public:
  explicit BatchFormer(const BatchFormerOptions& options);
  BatchFormer(const BatchFormer&) = delete;
  BatchFormer& operator=(const BatchFormer&) = delete;

  const BatchFormerOptions& options() const { return options_; }
  bool swap_enabled() const { return swap_planner_ != nullptr; }

  // Adds requests, all or nothing. A prompt the cache can never hold is not added: it is reported
  // in the next plan's rejected ids. `keys` (optional) are the chained keys of the prompt's full
  // blocks for prefix caching, one vector per request or none.
  void add_requests(const NewRequest* requests, size_t count, const std::vector<Hash128>* keys);
  // Removes requests in any state, freeing their blocks; an aborted request in the outstanding
  // plan is no longer expected in update().
  void abort(const RequestId* ids, size_t count);
  // New policy keys for waiting or running requests (takes effect at the next schedule()).
  void set_keys(const RequestId* ids, const double* keys, size_t count);
  // Sets the key of every live request of each client (fair-share policies key by client).
  void set_client_keys(const int32_t* client_ids, const double* keys, size_t count);

  StepPlan schedule();
  // The engine's report for the outstanding plan: every scheduled, non-aborted request once, with
  // the tokens it generated (0 for a prefill chunk that did not reach the end) and whether it
  // finished. A request also finishes on reaching max_new_tokens. Finished lengths feed the
  // estimator's history. Returns the ids that finished.
  std::vector<RequestId> update(const RequestId* ids, const int64_t* num_new_tokens, const uint8_t* finished,
                                size_t count);
  // Speculative decoding where the engine reports a step before its tokens are known (update() with
  // one token per sampling row): the draft tokens the engine then accepted, per request, are added
  // to its generated and computed tokens. Each request must be running and outside any outstanding
  // plan, and its lookahead slots must hold the accepted tokens' KV (num_lookahead_tokens covers
  // them). A request that reaches max_new_tokens finishes, as in update(); returns those ids. With
  // `client_ids_out` (count entries), each request's client id is written there (fair-share
  // policies charge the accepted tokens to it).
  std::vector<RequestId> accept_drafts(const RequestId* ids, const int64_t* num_accepted, size_t count,
                                       int32_t* client_ids_out = nullptr);
  // The engine stopped requests between steps (a stop string, EOS seen late, a client limit): they
  // leave in any state, like abort(), but count as finished and their output lengths
  // (`output_lens`, or the tokens generated so far when null; at most that) feed the estimator's
  // history. An engine that commits a plan before its tokens are known (asynchronous scheduling)
  // reports the true length here. A request stopped before its first token is not recorded.
  void stop(const RequestId* ids, const int64_t* output_lens, size_t count);
  // Preempts every running request by recompute (their KV is dropped; they wait again with their
  // generated tokens kept, and sit out the next schedule()) and returns their ids. Not while a plan
  // is outstanding.
  std::vector<RequestId> preempt_running();
  // The engine found KV these requests hold corrupt (a copy that moved it failed): each is preempted
  // by recompute wherever it is (running: its blocks are freed; swapped: its host copy is dropped;
  // waiting: it holds none) with `num_generated[i]` tokens generated, what the engine really has (at
  // most what the core counts: tokens committed ahead of their output are generated again). They
  // sit out the next schedule(). Not while a plan is outstanding; incoming requests are refused
  // (cancel the migration). The corrupt blocks may also be cached: reset_prefix_cache() forgets them.
  void recompute(const RequestId* ids, const int64_t* num_generated, size_t count);
  // Forgets every cached prefix (after a weight update the cached KV is stale); returns how many
  // cached blocks were dropped. Blocks held by running requests stay theirs but are not matched again.
  int64_t reset_prefix_cache();
  // The device prefix cache's events since the last call, oldest first (options.allocator.
  // track_cache_events; block_allocator.h's glossary): a stored event names the request (its id is
  // the sequence id) and the index of its block that got the key. Only blocks with keys given
  // (add_requests' block keys: the prompt's full blocks; reserve_incoming's) are ever cached.
  void pop_cache_events(std::vector<CacheEvent>& out);
  // Appends the key of every block the device prefix cache can match now.
  void cached_keys(std::vector<Hash128>& out) const;
  // While paused, waiting requests are not admitted; running and swapped ones go on.
  void pause_admission(bool paused);
  // The estimator's overflow_scenarios, changed between steps (PeakEstimator::set_overflow_scenarios).
  void set_overflow_scenarios(int32_t overflow_scenarios);
  // options.recompute_seconds_per_token, changed between steps (an engine that measures its prefill
  // cost as it runs: preemption kAuto and the host tier price recomputing with it).
  void set_recompute_seconds_per_token(double seconds);

  bool has_outstanding_plan() const;
  BatchFormerStats stats() const;
  BlockAllocatorStats allocator_stats() const { return allocator_.stats(); }
  SwapPlannerStats swap_stats() const;  // zeros without a host pool
  bool contains(RequestId id) const;
  RequestInfo info(RequestId id) const;
  std::vector<BlockId> block_table(RequestId id) const;
  std::vector<RequestId> running_ids() const;  // in running order
  std::vector<RequestId> waiting_ids() const;  // in admission order
  std::vector<RequestId> swapped_ids() const;  // in swap-in order
  // Throws std::logic_error describing the first broken invariant.
  void check_invariants() const;

  // ---- Cluster support (batch_former_migration.cpp). Not while a plan is outstanding: the
  // engine copies migrated KV between steps. ----
  InstanceLoad load();
  // Output lengths of requests that finished elsewhere (the other instances of a fleet): the
  // estimator learns from them as from its own, so an instance predicts well before it has seen
  // many finishes itself. class_ids may be null (class 0).
  void record_output_lengths(const int64_t* lengths, const int32_t* class_ids, size_t count);
  // Leading blocks of each key list found in the device prefix cache (what a dispatch there saves).
  std::vector<int64_t> prefix_hits(const std::vector<Hash128>* keys, size_t count) const;
  // The running, decoding request with the least KV (cheapest to move), not in `exclude`; -1: none.
  RequestId migration_candidate(const RequestId* exclude, size_t count) const;
  // Destination, first stage: creates `request` as incoming with `num_generated` tokens generated
  // and reserves blocks for its first `num_tokens` tokens (prefix-cache hits first; `keys` as in
  // add_requests). Appends its block table to `table` and returns the tokens found cached, which
  // need no copy. Throws OutOfBlocks (nothing changed) when the blocks or a sequence slot are
  // not there.
  int64_t reserve_incoming(const NewRequest& request, int64_t num_generated, int64_t num_tokens,
                           const std::vector<Hash128>* keys, std::vector<BlockId>& table);
  // Later stages: grows the reservation to `num_tokens` of a request that has generated
  // `num_generated` tokens at its source by now (all or nothing, OutOfBlocks); appends the blocks added.
  void extend_incoming(RequestId id, int64_t num_tokens, int64_t num_generated, std::vector<BlockId>& added);
  // The last stage arrived: the request runs here with its reserved tokens computed and
  // `num_generated` tokens generated (what the source had when it stopped it).
  void commit_incoming(RequestId id, int64_t num_generated);
  // An aborted migration: frees the reservations; nothing else changes.
  void cancel_incoming(const RequestId* ids, size_t count);
  // Source, last stage: running requests leave this instance (their KV now lives elsewhere).
  // Their blocks are freed (full ones stay in the prefix cache); counted as migrated_out.
  void migrate_out(const RequestId* ids, size_t count);

 private:
  struct Request {
    RequestId id = -1;
    int64_t prompt_len = 0, max_new_tokens = 0, true_output_len = -1;
    int64_t num_computed = 0, num_generated = 0;
    int64_t external_tokens = 0;
    int64_t scheduled = -1;  // tokens in the outstanding plan, -1 when not scheduled
    int64_t add_order = 0, admit_order = 0;
    int64_t num_preemptions = 0;
    int64_t update_stamp = -1;
    int64_t preempted_at_step = -1;
    double arrival = 0.0, key = 0.0;
    int32_t class_id = 0, client_id = 0, lora_id = 0, bypassed = 0;
    RequestState state = RequestState::kWaiting;
    bool finishing = false;  // reported finished in the update being applied
    bool announced = true;   // false while admitted by a host prefetch and not yet in a plan's rows
    std::vector<Hash128> keys;
    int64_t total() const { return prompt_len + num_generated; }
  };
  struct WaitingOrder {
    bool operator()(const Request* a, const Request* b) const;
  };
  // Gathers the request arrays the estimator reads.
  struct EstimatorInput {
    std::vector<int64_t> held, generated, max_new_tokens, known_lengths, ids;
    std::vector<int32_t> class_ids;
    void clear();
    void push(const Request& r);
    RequestArrays view(size_t begin) const;
  };

  static void reset_request(Request& r);
  // max_loras: fills active_loras_ with the adapters of running and incoming requests; then
  // lora_slot() says whether `lora_id` may run now, and takes a slot for it when it may.
  void collect_active_loras();
  bool lora_slot(int32_t lora_id);
  void change_key(Request& r, double key);
  Request& lookup(RequestId id, const char* name, size_t index);
  const Request& lookup(RequestId id, const char* name, size_t index) const;
  void sort_running();
  // The tokens a prefill with `context` computed tokens and `missing` more may take now, under the
  // chunk cap, the budget and what is left of the step's attention budget (batch_former_running.cpp).
  int64_t prefill_tokens(int64_t context, int64_t missing, int64_t budget) const;
  void charge_prefill(int64_t context, int64_t n);  // after a chunk was placed
  // The running stage (batch_former_running.cpp): decodes first, then prefill chunks.
  void schedule_running(int64_t& budget, bool& preempted_for_memory);
  // Allocates n more tokens for r and emits its row, preempting from the back of running_ (a
  // victim placed earlier in the step loses its row); false when r itself was preempted.
  bool place_running(Request& r, int64_t n, int64_t& budget, bool& preempted_for_memory);
  int64_t unemit(Request& r);  // removes r's row from the plan; returns its tokens
  void preempt(Request& r);
  void preempt_by_recompute(Request& r);
  bool should_swap(const Request& r) const;
  void swap_out(Request& r);
  // Brings swapped requests back in key order; false when one is left that could not come back.
  bool swap_in_swapped(int64_t& budget);
  void append_swap(const SwapPlan& swap, std::vector<int64_t>& ids, std::vector<int64_t>& indptr,
                   std::vector<int64_t>& extents, std::vector<int64_t>& descriptors, int64_t& bytes);
  // Host tier: leading blocks of r's prefix past `device_hit` blocks worth loading from the host
  // (batch_former_host_tier.cpp); at most `limit` blocks.
  int64_t host_hit_blocks(const Request& r, int64_t device_hit, int64_t limit) const;
  // Plans the load of r's blocks [first, first + count) from the host tier; its estimated seconds.
  double load_from_host(const Request& r, int64_t first, int64_t count);
  // Plans the write-back of the blocks the allocator evicted this step.
  void write_back_evictions();
  // A request that finished leaves its KV to the host tier: its resident host copy becomes cache,
  // and with write-through its full blocks are queued for the next plan.
  void retain_in_host_tier(const Request& r);
  void write_through_finished();  // plans the queued write-throughs (start of schedule())
  void drop(Request& r);  // removes a request in any state from its queue and frees its KV
  void remove(Request& r);  // drop() and forget it (it leaves the outstanding plan too)
  // Throws unless every id is live and appears once.
  void check_distinct_live(const RequestId* ids, size_t count) const;
  // check_distinct_live, and none of them incoming (abort and stop cannot end a migration).
  void check_distinct_settled(const RequestId* ids, size_t count, const char* call) const;
  void preempt_for_priority();
  void admit_waiting(int64_t& budget);
  // Allocates the first chunk of a waiting request; false when the cache or the budget cannot take it.
  bool start(Request& r, int64_t& budget);
  void emit(Request& r, int64_t num_tokens, const BlockId* added, size_t num_added);
  int64_t estimator_capacity() const;
  void finish(Request& r);
  // Running and incoming requests into `input` (what the estimator counts as held).
  void push_holders(EstimatorInput& input) const;
  void expect_between_steps(const char* call) const;
  // Throws unless every id is live, appears once and is in `state` (`refusal` ends the message).
  void expect_distinct_in_state(const RequestId* ids, size_t count, RequestState state, const char* refusal) const;

  BatchFormerOptions options_;
  mutable std::mutex mutex_;
  BlockAllocator allocator_;
  PeakEstimator estimator_;
  detail::IdMap<Request> requests_;
  std::set<Request*, WaitingOrder> waiting_;
  std::set<Request*, WaitingOrder> swapped_;
  std::unique_ptr<SwapPlanner> swap_planner_;
  std::vector<Request*> running_;
  std::vector<Request*> incoming_;  // migrating in, in reservation order
  bool running_sorted_ = true;
  StepPlan plan_;
  bool plan_outstanding_ = false;
  std::vector<int32_t> active_loras_;  // max_loras: adapters holding a slot this step (sorted)
  bool admission_paused_ = false;
  int64_t plan_expected_ = 0;  // scheduled requests not yet aborted
  std::vector<int64_t> pending_rejected_ids_;
  std::vector<int32_t> pending_rejected_reasons_;
  BatchFormerStats counters_;
  int64_t next_add_order_ = 0, next_admit_order_ = 0, update_stamp_ = 0;
  int64_t step_memory_preemptions_ = 0;
  int64_t step_preempted_tokens_ = 0;  // their victims' computed tokens (added with them at the end)
  int64_t step_attention_left_ = 0;  // token pairs; INT64_MAX without a prefill_attention_budget
  bool step_has_prefill_ = false;
  // Scratch reused every step.
  EstimatorInput running_input_, candidate_input_;
  std::vector<Request*> candidates_;
  std::vector<BlockId> scratch_blocks_;
  std::vector<BlockId> table_scratch_;  // the host tier's copy of a block table
  std::vector<int64_t> finished_lengths_;
  std::vector<int32_t> finished_classes_;
  std::vector<Eviction> evictions_;
  std::vector<Hash128> write_through_keys_;      // queued by finished requests
  std::vector<BlockId> write_through_blocks_;
  std::vector<BlockId> written_through_;         // this step's, sorted
  double write_through_seconds_ = 0.0;
};

}  // namespace kvsched
