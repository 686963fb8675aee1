// BatchFormer invariants (cpp/include/kvsched/batch_former.h), driven the way an engine drives it:
// schedule(), execute the plan, update(). The "engine" here simulates the KV cache itself: every
// device and host slot holds the token it was computed for, the plan's copies run in the
// documented order (swap_out and cache_write, then swap_in and cache_load, then copy_on_writes)
// before the forward pass, and every row checks that the KV its request claims as computed is
// really in its blocks. Any wrong block table, lost copy, wrong copy order or block handed to two
// requests shows up as a wrong token in some slot.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <ostream>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kvsched/batch_former.h"
#include "kvsched/block_hash.h"
#include "kvsched/errors.h"

namespace kvsched {
namespace {

constexpr int64_t kEmpty = std::numeric_limits<int64_t>::min();

struct Workload {
  std::vector<NewRequest> requests;
  std::map<RequestId, int64_t> output_len;  // what the "model" generates (unknown to the scheduler)
  std::map<RequestId, int> family;          // prompts of one family share their tokens (prefix hits)
  std::vector<std::vector<Hash128>> keys;   // per request: its prompt's full blocks' chained keys
};

struct WorkloadSpec {
  int num_requests = 40;
  int64_t min_prompt = 20, max_prompt = 200;
  int64_t min_output = 10, max_output = 150;
  int64_t max_new_tokens = 200;
  int num_families = 0;     // > 0: prompts come from that many families, with prefix keys
  bool random_keys = false; // policy keys at random instead of FCFS
  unsigned seed = 7;
};

int64_t prompt_token(int family, int64_t pos) { return int64_t{family} * 1000003 + pos + 1; }

Workload make_workload(const WorkloadSpec& spec, int32_t block_size) {
  Workload w;
  std::mt19937_64 rng(spec.seed);
  for (int i = 0; i < spec.num_requests; ++i) {
    NewRequest r;
    r.id = 100 + i;  // ids need not start at 0
    r.prompt_len = spec.min_prompt + static_cast<int64_t>(rng() % static_cast<uint64_t>(spec.max_prompt - spec.min_prompt + 1));
    r.max_new_tokens = spec.max_new_tokens;
    r.arrival_time = i * 0.01;
    r.key = spec.random_keys ? static_cast<double>(rng() % 1000) / 10.0 + i * 1e-6 : r.arrival_time;
    w.requests.push_back(r);
    w.output_len[r.id] = std::min<int64_t>(
        spec.max_new_tokens,
        spec.min_output + static_cast<int64_t>(rng() % static_cast<uint64_t>(spec.max_output - spec.min_output + 1)));
    int family = spec.num_families > 0 ? static_cast<int>(rng() % static_cast<uint64_t>(spec.num_families)) : 1000 + i;
    w.family[r.id] = family;
    std::vector<Hash128> keys;
    if (spec.num_families > 0) {
      std::vector<int32_t> tokens(static_cast<size_t>(r.prompt_len));
      for (int64_t p = 0; p < r.prompt_len; ++p) tokens[static_cast<size_t>(p)] = static_cast<int32_t>(prompt_token(family, p));
      keys.resize(static_cast<size_t>(r.prompt_len / block_size));
      hash_full_blocks(HashAlgorithm::kFast128, 0, tokens.data(), tokens.size(), block_size, keys.data());
    }
    w.keys.push_back(keys);
  }
  return w;
}

// The simulated engine. Checks run with EXPECT/ASSERT inside; step() returns false once a check failed.
class Engine {
 public:
  Engine(BatchFormer& former, const Workload& w) : former_(former), w_(w) {
    const BatchFormerOptions& o = former.options();
    bs_ = o.allocator.block_size;
    device_.assign(static_cast<size_t>(o.allocator.num_blocks) * static_cast<size_t>(bs_), kEmpty);
    host_.assign(static_cast<size_t>(std::max(1, o.swap.num_host_blocks)) * static_cast<size_t>(bs_), kEmpty);
    for (const NewRequest& r : w.requests) prompt_len_[r.id] = r.prompt_len;
  }

  void add_all() {
    bool any_keys = false;
    for (const auto& k : w_.keys) any_keys = any_keys || !k.empty();
    former_.add_requests(w_.requests.data(), w_.requests.size(), any_keys ? w_.keys.data() : nullptr);
    for (const NewRequest& r : w_.requests) expect(r.id);
  }

  // Adds the workload's request `i` alone.
  void add_one(size_t i) {
    former_.add_requests(&w_.requests[i], 1, w_.keys[i].empty() ? nullptr : &w_.keys[i]);
    expect(w_.requests[i].id);
  }

  void expect(RequestId id) {
    generated_[id] = 0;
    // The former caps max_new_tokens to what the cache can hold; the model stops there too.
    target_[id] = std::min(w_.output_len.at(id), former_.info(id).max_new_tokens);
  }

  // Token at position `pos` of request `id`: prompt tokens by family (shared prefixes hold equal
  // KV), generated ones unique to the request.
  int64_t content(RequestId id, int64_t pos) const {
    if (pos < prompt_len_.at(id)) return prompt_token(w_.family.at(id), pos);
    return -(id * 1000003 + pos + 1);
  }

  int64_t& slot(std::vector<int64_t>& pool, int64_t block, int64_t offset) {
    return pool[static_cast<size_t>(block * bs_ + offset)];
  }

  // (src_block, dst_block, n_blocks) extents between pools.
  void copy_extents(const std::vector<int64_t>& extents, std::vector<int64_t>& from, std::vector<int64_t>& to) {
    ASSERT_EQ(extents.size() % 3, 0u);
    const int64_t from_blocks = static_cast<int64_t>(from.size()) / bs_, to_blocks = static_cast<int64_t>(to.size()) / bs_;
    for (size_t x = 0; x < extents.size(); x += 3) {
      ASSERT_GT(extents[x + 2], 0) << "empty extent";
      ASSERT_TRUE(extents[x] >= 0 && extents[x] + extents[x + 2] <= from_blocks) << "source blocks out of range";
      ASSERT_TRUE(extents[x + 1] >= 0 && extents[x + 1] + extents[x + 2] <= to_blocks) << "destination blocks out of range";
      for (int64_t b = 0; b < extents[x + 2]; ++b) {
        for (int64_t t = 0; t < bs_; ++t) slot(to, extents[x + 1] + b, t) = slot(from, extents[x] + b, t);
      }
    }
  }

  static std::set<int64_t> extent_blocks(const std::vector<int64_t>& extents, int column) {
    std::set<int64_t> blocks;
    for (size_t x = 0; x + 2 < extents.size(); x += 3) {
      for (int64_t b = 0; b < extents[x + 2]; ++b) blocks.insert(extents[x + static_cast<size_t>(column)] + b);
    }
    return blocks;
  }

  void check_csr(const std::vector<int64_t>& ids, const std::vector<int64_t>& indptr, const std::vector<int64_t>& extents,
                 const char* what) {
    ASSERT_EQ(indptr.size(), ids.size() + 1) << what;
    ASSERT_EQ(indptr.front(), 0) << what;
    ASSERT_EQ(indptr.back() * 3, static_cast<int64_t>(extents.size())) << what;
    for (size_t i = 1; i < indptr.size(); ++i) ASSERT_GE(indptr[i], indptr[i - 1]) << what;
  }

  // One engine step; false when finished (nothing left) or when a check failed.
  bool step() {
    if (finished_.size() == w_.requests.size()) return false;
    const BatchFormerOptions& o = former_.options();
    const std::vector<RequestId> running_before = former_.running_ids();
    StepPlan plan = former_.schedule();
    ++steps_;
    const size_t rows = plan.req_ids.size();
    // ---- plan shape and budgets ----
    EXPECT_GT(rows + plan.swapped_in_ids.size() + plan.cache_load_ids.size(), 0u)
        << "step " << steps_ << ": nothing scheduled with " << w_.requests.size() - finished_.size() << " unfinished";
    EXPECT_EQ(plan.num_tokens.size(), rows);
    EXPECT_EQ(plan.computed_offsets.size(), rows);
    EXPECT_EQ(plan.num_generated.size(), rows);
    EXPECT_EQ(plan.samples.size(), rows);
    EXPECT_EQ(plan.is_prefill.size(), rows);
    EXPECT_EQ(plan.prompt_lens.size(), rows);
    EXPECT_EQ(plan.block_indptr.size(), rows + 1);
    EXPECT_EQ(plan.block_indptr.back(), static_cast<int64_t>(plan.new_blocks.size()));
    for (int32_t b : plan.new_blocks) EXPECT_TRUE(b >= 0 && b < o.allocator.num_blocks) << "block " << b;
    for (size_t x = 0; x < plan.copy_on_writes.size(); x += 3) {
      for (size_t k = 1; k < 3 && x + k < plan.copy_on_writes.size(); ++k) {
        EXPECT_TRUE(plan.copy_on_writes[x + k] >= 0 && plan.copy_on_writes[x + k] < o.allocator.num_blocks);
      }
    }
    check_csr(plan.swapped_out_ids, plan.swap_out_indptr, plan.swap_out, "swap_out");
    check_csr(plan.swapped_in_ids, plan.swap_in_indptr, plan.swap_in, "swap_in");
    check_csr(plan.cache_load_ids, plan.cache_load_indptr, plan.cache_load, "cache_load");
    EXPECT_LE(static_cast<int64_t>(rows), int64_t{o.max_num_seqs});
    int64_t scheduled = 0;
    for (size_t i = 0; i < rows; ++i) {
      EXPECT_GE(plan.num_tokens[i], 1);
      if (plan.is_prefill[i] && o.max_prefill_chunk > 0) {
        EXPECT_LE(plan.num_tokens[i], o.max_prefill_chunk);
      }
      scheduled += plan.num_tokens[i];
    }
    EXPECT_LE(scheduled, o.max_num_batched_tokens) << "step " << steps_;
    max_step_tokens_ = std::max(max_step_tokens_, scheduled);
    EXPECT_LE(former_.stats().num_running, int64_t{o.max_num_seqs});
    EXPECT_TRUE(plan.rejected_ids.empty());
    if (::testing::Test::HasFailure()) return false;

    // ---- preemptions: their tables are gone; the victims are the back of the running list ----
    std::vector<RequestId> victims = plan.preempted_ids;
    victims.insert(victims.end(), plan.swapped_out_ids.begin(), plan.swapped_out_ids.end());
    for (RequestId id : plan.preempted_ids) {
      RequestInfo info = former_.info(id);
      EXPECT_EQ(info.state, RequestState::kWaiting);
      EXPECT_EQ(info.num_computed, 0);
      EXPECT_EQ(info.num_generated, generated_[id]) << "a recompute keeps the generated tokens";
      EXPECT_TRUE(former_.block_table(id).empty());
      tables_.erase(id);
    }
    for (RequestId id : plan.swapped_out_ids) {
      RequestInfo info = former_.info(id);
      EXPECT_EQ(info.state, RequestState::kSwapped);
      EXPECT_EQ(info.num_generated, generated_[id]);
      tables_.erase(id);
    }
    if (!victims.empty()) {
      preempted_steps_ += 1;
      for (RequestId id : victims) {
        EXPECT_EQ(std::count(running_before.begin(), running_before.end(), id), 1) << "victim " << id << " was not running";
      }
      double lowest_victim_key = std::numeric_limits<double>::infinity();
      for (RequestId id : victims) lowest_victim_key = std::min(lowest_victim_key, former_.info(id).key);
      for (RequestId id : former_.running_ids()) {
        EXPECT_LE(former_.info(id).key, lowest_victim_key) << "request " << id << " kept running with a larger key";
      }
    }
    for (RequestId id : plan.req_ids) {
      EXPECT_EQ(std::count(victims.begin(), victims.end(), id), 0) << "a victim has a row in its own step";
    }

    // ---- the copies, in the documented order ----
    {
      // Device blocks that a device-to-host copy reads and this plan also writes (rows' new blocks,
      // or host-to-device copies): here the order of the copies matters.
      std::set<int64_t> read = extent_blocks(plan.swap_out, 0), written;
      for (int64_t b : extent_blocks(plan.cache_write, 0)) read.insert(b);
      for (int64_t b : extent_blocks(plan.swap_in, 1)) written.insert(b);
      for (int64_t b : extent_blocks(plan.cache_load, 1)) written.insert(b);
      for (int64_t b : written) loads_over_reads_ += read.count(b);
      for (int32_t b : plan.new_blocks) reused_copy_sources_ += read.count(b);
    }
    copy_extents(plan.swap_out, device_, host_);
    copy_extents(plan.cache_write, device_, host_);
    copy_extents(plan.swap_in, host_, device_);
    copy_extents(plan.cache_load, host_, device_);
    EXPECT_EQ(plan.copy_on_writes.size() % 3, 0u);
    for (size_t x = 0; x + 2 < plan.copy_on_writes.size(); x += 3) {
      for (int64_t t = 0; t < bs_; ++t) slot(device_, plan.copy_on_writes[x + 2], t) = slot(device_, plan.copy_on_writes[x + 1], t);
    }
    swap_outs_ += static_cast<int64_t>(plan.swapped_out_ids.size());
    swap_ins_ += static_cast<int64_t>(plan.swapped_in_ids.size());
    cache_loads_ += static_cast<int64_t>(plan.cache_load.size() / 3);
    if (::testing::Test::HasFailure()) return false;

    // ---- the forward pass: every row writes its tokens' KV, then reads its whole context ----
    for (size_t i = 0; i < rows; ++i) {
      const RequestId id = plan.req_ids[i];
      std::vector<BlockId>& table = tables_[id];
      table.insert(table.end(), plan.new_blocks.begin() + plan.block_indptr[i],
                   plan.new_blocks.begin() + plan.block_indptr[i + 1]);
      const int64_t total = prompt_len_[id] + generated_[id];
      EXPECT_EQ(plan.num_generated[i], generated_[id]) << "request " << id;
      EXPECT_EQ(plan.prompt_lens[i], prompt_len_[id]);
      const int64_t end = plan.computed_offsets[i] + plan.num_tokens[i];
      EXPECT_LE(end, total) << "request " << id << " scheduled past its sequence";
      EXPECT_EQ(plan.samples[i] != 0, end == total) << "request " << id;
      EXPECT_GE(static_cast<int64_t>(table.size()) * bs_, end) << "request " << id << ": its blocks cannot hold its tokens";
      if (::testing::Test::HasFailure()) return false;
      for (int64_t p = plan.computed_offsets[i]; p < end; ++p) {
        slot(device_, table[static_cast<size_t>(p / bs_)], p % bs_) = content(id, p);
      }
    }
    for (size_t i = 0; i < rows; ++i) {
      const RequestId id = plan.req_ids[i];
      const std::vector<BlockId>& table = tables_[id];
      const int64_t end = plan.computed_offsets[i] + plan.num_tokens[i];
      for (int64_t p = 0; p < end; ++p) {
        const int64_t found = slot(device_, table[static_cast<size_t>(p / bs_)], p % bs_);
        if (found != content(id, p)) {
          ADD_FAILURE() << "step " << steps_ << ": request " << id << " position " << p << " (block "
                        << table[static_cast<size_t>(p / bs_)] << ") holds " << found << ", expected "
                        << content(id, p) << " (computed " << plan.computed_offsets[i] << ", row tokens "
                        << plan.num_tokens[i] << ")";
          return false;
        }
      }
    }

    // ---- the model samples; the engine reports (a request aborted meanwhile is left out) ----
    if (abort_in_plan_ >= 0) {
      EXPECT_EQ(std::count(plan.req_ids.begin(), plan.req_ids.end(), abort_in_plan_), 1);
      abort_now(abort_in_plan_);
      abort_in_plan_ = -1;
    }
    std::vector<RequestId> ids;
    std::vector<int64_t> new_tokens;
    std::vector<uint8_t> done;
    for (size_t i = 0; i < rows; ++i) {
      const RequestId id = plan.req_ids[i];
      if (aborted_.count(id)) continue;
      ids.push_back(id);
      new_tokens.push_back(plan.samples[i] ? 1 : 0);
      done.push_back(plan.samples[i] && ++generated_[id] >= target_[id]);
    }
    std::vector<RequestId> ended = former_.update(ids.data(), new_tokens.data(), done.data(), ids.size());
    for (RequestId id : ended) {
      EXPECT_TRUE(finished_.insert(id).second) << "request " << id << " finished twice";
      EXPECT_EQ(generated_[id], target_[id]) << "request " << id << " finished early or late";
      EXPECT_FALSE(former_.contains(id));
      tables_.erase(id);
    }
    return !::testing::Test::HasFailure() && check_between_steps();
  }

  // The client went away: the engine aborts the request and forgets it.
  void abort_now(RequestId id) {
    former_.abort(&id, 1);
    aborted_.insert(id);
    finished_.insert(id);
    tables_.erase(id);
  }

  bool check_between_steps() {
    EXPECT_NO_THROW(former_.check_invariants());
    // The engine's tables, built from the plans' new blocks, are the core's.
    std::set<BlockId> held;
    size_t table_blocks = 0;
    for (RequestId id : former_.running_ids()) {
      EXPECT_EQ(former_.block_table(id), tables_[id]) << "request " << id;
      held.insert(tables_[id].begin(), tables_[id].end());
      table_blocks += tables_[id].size();
    }
    BlockAllocatorStats s = former_.allocator_stats();
    EXPECT_EQ(s.num_used, static_cast<int32_t>(held.size()));
    EXPECT_LE(s.num_used, s.num_blocks);
    EXPECT_EQ(s.num_free + s.num_cached + s.num_pinned + s.num_used, s.num_blocks);
    if (w_.keys.empty() || w_.keys[0].empty()) {
      EXPECT_EQ(held.size(), table_blocks) << "without prefix caching no block is shared";
    }
    max_used_ = std::max(max_used_, s.num_used);
    return !::testing::Test::HasFailure();
  }

  // Runs to completion; false on a failed check or when it does not end in `max_steps`.
  bool run(int64_t max_steps = 20000) {
    while (finished_.size() < w_.requests.size()) {
      if (!step()) return false;
      if (steps_ > max_steps) {
        ADD_FAILURE() << "not finished after " << max_steps << " steps";
        return false;
      }
    }
    return true;
  }

  void expect_all_finished_and_freed() {
    EXPECT_EQ(finished_.size(), w_.requests.size());
    for (const NewRequest& r : w_.requests) {
      EXPECT_EQ(finished_.count(r.id), 1u) << "request " << r.id << " was lost";
      if (!aborted_.count(r.id)) {
        EXPECT_EQ(generated_[r.id], target_[r.id]);
      }
    }
    BatchFormerStats st = former_.stats();
    EXPECT_EQ(st.finished, static_cast<int64_t>(w_.requests.size() - aborted_.size()));
    EXPECT_EQ(st.aborted, static_cast<int64_t>(aborted_.size()));
    EXPECT_EQ(st.num_waiting + st.num_running + st.num_swapped + st.num_incoming, 0);
    BlockAllocatorStats s = former_.allocator_stats();
    EXPECT_EQ(s.num_used, 0);
    EXPECT_EQ(s.num_pinned, 0);
    EXPECT_EQ(s.num_sequences, 0);
    EXPECT_EQ(s.num_free + s.num_cached, s.num_blocks);
    SwapPlannerStats h = former_.swap_stats();
    EXPECT_EQ(h.num_swapped, 0);
    EXPECT_EQ(h.num_swapped_blocks, 0);
    EXPECT_EQ(h.num_resident_copies, 0);
    EXPECT_NO_THROW(former_.check_invariants());
  }

  BatchFormer& former_;
  const Workload& w_;
  int64_t bs_ = 0;
  std::vector<int64_t> device_, host_;
  std::map<RequestId, std::vector<BlockId>> tables_;
  std::map<RequestId, int64_t> prompt_len_, generated_, target_;
  std::set<RequestId> finished_, aborted_;  // finished_ holds every request that ended, aborted ones too
  RequestId abort_in_plan_ = -1;            // aborted after the next forward pass, before update()
  int64_t steps_ = 0, preempted_steps_ = 0, swap_outs_ = 0, swap_ins_ = 0, cache_loads_ = 0;
  int64_t reused_copy_sources_ = 0, loads_over_reads_ = 0, max_step_tokens_ = 0;
  int32_t max_used_ = 0;
};

NewRequest request(RequestId id, int64_t prompt, int64_t max_new) {
  NewRequest r;
  r.id = id;
  r.prompt_len = prompt;
  r.max_new_tokens = max_new;
  r.arrival_time = static_cast<double>(id);
  r.key = static_cast<double>(id);
  return r;
}

BatchFormerOptions base_options(int32_t num_blocks) {
  BatchFormerOptions o;
  o.allocator.num_blocks = num_blocks;
  o.allocator.block_size = 16;
  o.max_num_batched_tokens = 256;
  o.max_num_seqs = 16;
  o.max_prefill_chunk = 64;
  return o;
}

struct LoopCase {
  std::string name;
  std::function<void(BatchFormerOptions&)> configure;
  WorkloadSpec workload;
  std::function<void(const Engine&, const BatchFormerStats&)> expect;
};

// Failure messages name the case instead of dumping its bytes.
void PrintTo(const LoopCase& c, std::ostream* os) { *os << c.name; }

std::vector<LoopCase> loop_cases() {
  std::vector<LoopCase> cases;
  // As examples/cpp/step_loop.cpp: past_future admission on a cache that holds part of the load.
  cases.push_back({"PastFutureRecompute", [](BatchFormerOptions&) {}, WorkloadSpec{},
                   [](const Engine& e, const BatchFormerStats&) { EXPECT_GT(e.max_used_, 32); }});
  // Aggressive admission on a small cache: preemption by recompute must happen and cost nothing.
  cases.push_back({"AggressiveRecomputeSmallKv",
                   [](BatchFormerOptions& o) {
                     o.allocator.num_blocks = 24;
                     o.admission = AdmissionMode::kAggressive;
                   },
                   WorkloadSpec{},
                   [](const Engine& e, const BatchFormerStats& s) {
                     EXPECT_GT(s.preemptions, 0);
                     EXPECT_GT(e.preempted_steps_, 0);
                   }});
  // The same by swap: victims' KV goes to host blocks and comes back by copy.
  cases.push_back({"AggressiveSwapSmallKv",
                   [](BatchFormerOptions& o) {
                     o.allocator.num_blocks = 24;
                     o.admission = AdmissionMode::kAggressive;
                     o.preemption = PreemptionMode::kSwap;
                     o.swap.num_host_blocks = 96;
                   },
                   WorkloadSpec{},
                   [](const Engine& e, const BatchFormerStats& s) {
                     EXPECT_GT(s.swap_preemptions, 0);
                     EXPECT_GT(s.swapped_in, 0);
                     EXPECT_EQ(e.swap_outs_, s.swap_preemptions);
                     EXPECT_EQ(e.swap_ins_, s.swapped_in);
                   }});
  // Conservative admission plans for max_new_tokens: it never preempts.
  cases.push_back({"ConservativeNeverPreempts",
                   [](BatchFormerOptions& o) {
                     o.allocator.num_blocks = 40;
                     o.admission = AdmissionMode::kConservative;
                   },
                   WorkloadSpec{},
                   [](const Engine&, const BatchFormerStats& s) { EXPECT_EQ(s.preemptions, 0); }});
  // Shared prompts with prefix caching: hits must hold the same KV.
  {
    WorkloadSpec spec;
    spec.num_families = 3;
    cases.push_back({"PrefixCachingRecompute",
                     [](BatchFormerOptions& o) {
                       o.allocator.num_blocks = 32;
                       o.admission = AdmissionMode::kAggressive;
                     },
                     spec,
                     [](const Engine&, const BatchFormerStats& s) { EXPECT_GT(s.preemptions, 0); }});
  }
  // Everything at once: random priorities with priority preemption, swap, the host tier of the
  // prefix cache with write-through. The copies only come out right in the documented order.
  {
    WorkloadSpec spec;
    spec.num_families = 3;
    spec.random_keys = true;
    spec.num_requests = 48;
    cases.push_back({"PrioritySwapHostTier",
                     [](BatchFormerOptions& o) {
                       o.allocator.num_blocks = 32;
                       o.admission = AdmissionMode::kAggressive;
                       o.preemption = PreemptionMode::kSwap;
                       o.preempt_for_priority = true;
                       o.swap.num_host_blocks = 64;
                       o.host_prefix_cache = true;
                       o.host_cache_write_through = true;
                       o.recompute_seconds_per_token = 1.0;  // host hits always beat recomputing
                     },
                     spec,
                     [](const Engine& e, const BatchFormerStats& s) {
                       EXPECT_GT(s.swap_preemptions, 0);
                       EXPECT_GT(s.priority_preemptions, 0);
                       EXPECT_GT(e.cache_loads_, 0);
                     }});
  }
  // kAuto swaps when the round trip is cheaper than recomputing (here always).
  cases.push_back({"AutoPreemptionSwapsWhenCheaper",
                   [](BatchFormerOptions& o) {
                     o.allocator.num_blocks = 24;
                     o.admission = AdmissionMode::kAggressive;
                     o.preemption = PreemptionMode::kAuto;
                     o.swap.num_host_blocks = 96;
                     o.recompute_seconds_per_token = 1.0;
                   },
                   WorkloadSpec{},
                   [](const Engine&, const BatchFormerStats& s) {
                     EXPECT_GT(s.swap_preemptions, 0);
                     EXPECT_EQ(s.swap_preemptions, s.preemptions);
                   }});
  return cases;
}

class StepLoop : public ::testing::TestWithParam<LoopCase> {};

// Why: the scheduler's contract with an engine. Over a seeded workload run to completion: nothing
// is lost (every request finishes with exactly its tokens), every plan stays within the token
// budget, max_num_seqs and the chunk cap, KV in use never exceeds the cache, the engine's view of
// every block table matches the core's, the KV each row reads is the KV it computed, victims are
// the lowest-priority running requests, and at the end every block is free again.
TEST_P(StepLoop, EveryRequestFinishesWithinBudgetsAndFreesItsBlocks) {
  const LoopCase& c = GetParam();
  BatchFormerOptions o = base_options(64);
  c.configure(o);
  BatchFormer former(o);
  Workload w = make_workload(c.workload, o.allocator.block_size);
  Engine engine(former, w);
  engine.add_all();
  ASSERT_TRUE(engine.run());
  engine.expect_all_finished_and_freed();
  c.expect(engine, former.stats());
}

INSTANTIATE_TEST_SUITE_P(BatchFormer, StepLoop, ::testing::ValuesIn(loop_cases()),
                         [](const ::testing::TestParamInfo<LoopCase>& param) { return param.param.name; });

// Why: batch_former.h's copy order ("swap_out and cache_write ... then swap_in and cache_load"):
// a device block evicted from the prefix cache is written back to the host and, in the same plan,
// handed to a request whose prefix is loaded from the host into it. Run the other way round, the
// write-back would save the loaded KV under the evicted block's key, and a later hit on that key
// would read the wrong KV. Requests arrive one at a time so that the cache fills with cached blocks.
TEST(BatchFormerHostTier, LoadIntoABlockBeingWrittenBackKeepsBothContents) {
  BatchFormerOptions o = base_options(8);  // 128 tokens of device KV
  o.max_num_batched_tokens = 128;
  o.max_prefill_chunk = 0;
  o.swap.num_host_blocks = 32;
  o.host_prefix_cache = true;
  o.recompute_seconds_per_token = 1.0;  // a host hit always beats recomputing
  BatchFormer former(o);
  Workload w;
  const std::vector<std::pair<int, int64_t>> arrivals = {{1, 64}, {2, 112}, {1, 64}, {2, 112}, {1, 64}};
  for (size_t i = 0; i < arrivals.size(); ++i) {
    NewRequest r = request(static_cast<RequestId>(i + 1), arrivals[i].second, 4);
    w.requests.push_back(r);
    w.output_len[r.id] = 1;
    w.family[r.id] = arrivals[i].first;
    std::vector<int32_t> tokens(static_cast<size_t>(r.prompt_len));
    for (int64_t p = 0; p < r.prompt_len; ++p) tokens[static_cast<size_t>(p)] = static_cast<int32_t>(prompt_token(arrivals[i].first, p));
    w.keys.emplace_back(static_cast<size_t>(r.prompt_len / 16));
    hash_full_blocks(HashAlgorithm::kFast128, 0, tokens.data(), tokens.size(), 16, w.keys.back().data());
  }
  Engine engine(former, w);
  for (size_t i = 0; i < w.requests.size(); ++i) {
    engine.add_one(i);
    while (engine.finished_.size() <= i) ASSERT_TRUE(engine.step()) << "request " << i + 1;
  }
  engine.expect_all_finished_and_freed();
  EXPECT_GT(engine.loads_over_reads_, 0) << "the scenario did not happen: the test lost its point";
  EXPECT_GT(former.stats().host_hit_blocks, 0);
}

// Why: an aborted request (client gone) must give back its KV at once, in any state (running,
// waiting, or in the outstanding plan, which update() then no longer expects), and the others must
// go on unharmed to completion.
TEST(BatchFormerAbort, AbortedRequestFreesItsBlocks) {
  BatchFormerOptions o = base_options(48);
  BatchFormer former(o);
  Workload w = make_workload(WorkloadSpec{}, o.allocator.block_size);
  Engine engine(former, w);
  engine.add_all();
  for (int i = 0; i < 12; ++i) ASSERT_TRUE(engine.step());
  std::vector<RequestId> running = former.running_ids();
  ASSERT_GE(running.size(), 2u);
  const RequestId victim = running[running.size() / 2];
  const int32_t used = former.allocator_stats().num_used;
  const size_t table = former.block_table(victim).size();
  ASSERT_GT(table, 0u);
  engine.abort_now(victim);
  EXPECT_FALSE(former.contains(victim));
  EXPECT_EQ(former.allocator_stats().num_used, used - static_cast<int32_t>(table));
  EXPECT_EQ(former.stats().aborted, 1);
  ASSERT_TRUE(engine.check_between_steps());

  std::vector<RequestId> waiting = former.waiting_ids();
  ASSERT_FALSE(waiting.empty());
  const int64_t num_waiting = former.stats().num_waiting;
  engine.abort_now(waiting.back());
  EXPECT_EQ(former.stats().num_waiting, num_waiting - 1);
  EXPECT_EQ(former.allocator_stats().num_used, used - static_cast<int32_t>(table));  // it held nothing

  running = former.running_ids();
  ASSERT_FALSE(running.empty());
  engine.abort_in_plan_ = running.front();  // running now, so in the next plan
  ASSERT_TRUE(engine.step());
  EXPECT_EQ(former.stats().aborted, 3);
  ASSERT_TRUE(engine.run());
  engine.expect_all_finished_and_freed();
}

struct FormerSnapshot {
  BatchFormerStats stats;
  std::vector<RequestId> waiting, running, swapped;
  int32_t used = 0;
  bool outstanding = false;
};

FormerSnapshot snapshot(const BatchFormer& f) {
  return FormerSnapshot{f.stats(), f.waiting_ids(), f.running_ids(), f.swapped_ids(), f.allocator_stats().num_used,
                        f.has_outstanding_plan()};
}

void expect_same(const FormerSnapshot& a, const FormerSnapshot& b) {
  EXPECT_EQ(a.waiting, b.waiting);
  EXPECT_EQ(a.running, b.running);
  EXPECT_EQ(a.swapped, b.swapped);
  EXPECT_EQ(a.used, b.used);
  EXPECT_EQ(a.outstanding, b.outstanding);
  EXPECT_EQ(a.stats.added, b.stats.added);
  EXPECT_EQ(a.stats.aborted, b.stats.aborted);
  EXPECT_EQ(a.stats.finished, b.stats.finished);
  EXPECT_EQ(a.stats.rejected, b.stats.rejected);
  EXPECT_EQ(a.stats.steps, b.stats.steps);
}

// Why: errors.h: "every call checks all of its input before changing anything"; a batch with one
// bad request adds none of them, and a refused update() leaves the plan outstanding to be
// reported correctly.
TEST(BatchFormerErrors, BadInputThrowsAndChangesNothing) {
  BatchFormerOptions o = base_options(64);
  BatchFormer former(o);
  std::vector<NewRequest> first = {request(1, 40, 20), request(2, 30, 20)};
  former.add_requests(first.data(), first.size(), nullptr);
  StepPlan plan = former.schedule();
  ASSERT_EQ(plan.req_ids.size(), 2u);

  FormerSnapshot before = snapshot(former);
  auto refused_add = [&](NewRequest bad, const char* why) {
    std::vector<NewRequest> batch = {request(50, 10, 10), bad};
    EXPECT_THROW(former.add_requests(batch.data(), batch.size(), nullptr), std::invalid_argument) << why;
    EXPECT_FALSE(former.contains(50)) << why << ": the valid request of the batch was added";
    expect_same(before, snapshot(former));
  };
  refused_add(request(1, 10, 10), "an id that exists");
  refused_add(request(50, 10, 10), "an id twice in the batch");
  refused_add(request(-3, 10, 10), "a negative id");
  refused_add(request(51, 0, 10), "an empty prompt");
  refused_add(request(51, 10, 0), "max_new_tokens 0");
  {
    NewRequest r = request(51, 10, 10);
    r.key = std::nan("");
    refused_add(r, "a NaN key");
    r = request(51, 10, 10);
    r.arrival_time = std::numeric_limits<double>::infinity();
    refused_add(r, "an infinite arrival time");
    r = request(51, 10, 10);
    r.external_tokens = 10;
    refused_add(r, "external tokens covering the whole prompt");
    r = request(51, 10, 10);
    r.class_id = -1;
    refused_add(r, "a negative class");
  }

  // One plan at a time.
  EXPECT_THROW(former.schedule(), std::invalid_argument);
  expect_same(before, snapshot(former));

  // Bad reports of the outstanding plan: nothing changes, the plan is still outstanding.
  std::vector<int64_t> ones(2, 1), zeros(2, 0);
  std::vector<uint8_t> no(2, 0);
  std::vector<RequestId> unknown = {1, 77};
  EXPECT_THROW(former.update(unknown.data(), ones.data(), no.data(), 2), UnknownId);
  std::vector<RequestId> twice = {1, 1};
  EXPECT_THROW(former.update(twice.data(), ones.data(), no.data(), 2), std::invalid_argument);
  EXPECT_THROW(former.update(plan.req_ids.data(), ones.data(), no.data(), 1), std::invalid_argument);  // one missing
  EXPECT_THROW(former.update(plan.req_ids.data(), zeros.data(), no.data(), 2), std::invalid_argument);  // rows sample
  std::vector<int64_t> too_many = {5, 5};
  EXPECT_THROW(former.update(plan.req_ids.data(), too_many.data(), no.data(), 2), std::invalid_argument);
  expect_same(before, snapshot(former));
  EXPECT_NO_THROW(former.check_invariants());

  // abort / stop / set_keys: all or nothing.
  std::vector<RequestId> partly_unknown = {1, 77};
  EXPECT_THROW(former.abort(partly_unknown.data(), 2), UnknownId);
  std::vector<RequestId> duplicated = {2, 2};
  EXPECT_THROW(former.abort(duplicated.data(), 2), std::invalid_argument);
  std::vector<int64_t> lengths = {0, 5};  // request 2 has generated nothing
  std::vector<RequestId> both = {1, 2};
  EXPECT_THROW(former.stop(both.data(), lengths.data(), 2), std::invalid_argument);
  std::vector<double> keys = {1.0, std::nan("")};
  EXPECT_THROW(former.set_keys(both.data(), keys.data(), 2), std::invalid_argument);
  EXPECT_THROW(former.info(77), UnknownId);
  expect_same(before, snapshot(former));

  // The correct report is still accepted.
  EXPECT_NO_THROW(former.update(plan.req_ids.data(), ones.data(), no.data(), 2));
  EXPECT_THROW(former.update(plan.req_ids.data(), ones.data(), no.data(), 2), std::invalid_argument);  // no plan now
  EXPECT_NO_THROW(former.check_invariants());
}

// Why: bad options are refused at construction, not discovered steps later.
TEST(BatchFormerErrors, BadOptionsAreRefused) {
  auto refused = [](std::function<void(BatchFormerOptions&)> change, const char* why) {
    BatchFormerOptions o = base_options(64);
    change(o);
    EXPECT_THROW(BatchFormer{o}, std::invalid_argument) << why;
  };
  refused([](BatchFormerOptions& o) { o.max_num_batched_tokens = 0; }, "no token budget");
  refused([](BatchFormerOptions& o) { o.max_num_batched_tokens = o.max_num_seqs - 1; }, "a budget below max_num_seqs");
  refused([](BatchFormerOptions& o) { o.max_num_seqs = 0; }, "max_num_seqs 0");
  refused([](BatchFormerOptions& o) { o.watermark_blocks = o.allocator.num_blocks; }, "a watermark of the whole cache");
  refused([](BatchFormerOptions& o) { o.preemption = PreemptionMode::kSwap; }, "swap without a host pool");
  refused([](BatchFormerOptions& o) { o.host_prefix_cache = true; }, "a host tier without a host pool");
  refused([](BatchFormerOptions& o) { o.allocator.num_blocks = 0; }, "an empty cache");
}

// Why: a prompt the cache can never hold must be reported (rejected with its reason), not queued
// forever; a max_new_tokens past the cache is capped so that the request alone can finish.
TEST(BatchFormerAdmission, OversizedPromptIsRejectedAndMaxNewTokensCapped) {
  BatchFormerOptions o = base_options(8);  // 128 tokens
  BatchFormer former(o);
  std::vector<NewRequest> batch = {request(1, 128, 10), request(2, 100, 1000)};
  former.add_requests(batch.data(), batch.size(), nullptr);
  EXPECT_FALSE(former.contains(1));
  EXPECT_EQ(former.info(2).max_new_tokens, 28);
  BatchFormerStats s = former.stats();
  EXPECT_EQ(s.rejected, 1);
  EXPECT_EQ(s.max_new_tokens_capped, 1);
  StepPlan plan = former.schedule();
  ASSERT_EQ(plan.rejected_ids, std::vector<int64_t>{1});
  ASSERT_EQ(plan.rejected_reasons, std::vector<int32_t>{static_cast<int32_t>(RejectReason::kPromptTooLong)});
  EXPECT_NO_THROW(former.check_invariants());
}

}  // namespace
}  // namespace kvsched
