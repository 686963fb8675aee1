// An engine's step loop on kvsched's core, in C++: 40 requests of known lengths on a KV cache that
// holds a fraction of them, past_future admission, preemption by recompute. The "model" generates
// one token per sampling row; a request finishes at its own output length. Exits non-zero when a
// request is lost or the core's invariants break.
#include <cstdint>
#include <cstdio>
#include <exception>
#include <random>
#include <unordered_map>
#include <vector>

#include "kvsched/batch_former.h"

int main() {
  try {
    kvsched::BatchFormerOptions options;
    options.allocator.num_blocks = 64;  // 1,024 tokens of KV
    options.allocator.block_size = 16;
    options.max_num_batched_tokens = 512;
    options.max_num_seqs = 32;
    kvsched::BatchFormer former(options);

    std::mt19937_64 rng(7);
    std::vector<kvsched::NewRequest> requests;
    std::unordered_map<kvsched::RequestId, int64_t> output_len, generated;
    for (kvsched::RequestId id = 0; id < 40; ++id) {
      kvsched::NewRequest r;
      r.id = id;
      r.prompt_len = 20 + static_cast<int64_t>(rng() % 180);
      r.max_new_tokens = 200;
      r.arrival_time = static_cast<double>(id) * 0.01;
      r.key = r.arrival_time;  // fcfs
      requests.push_back(r);
      output_len[id] = 10 + static_cast<int64_t>(rng() % 140);  // unknown to the scheduler
      generated[id] = 0;
    }
    former.add_requests(requests.data(), requests.size(), nullptr);

    int64_t steps = 0, finished = 0;
    std::vector<kvsched::RequestId> ids;
    std::vector<int64_t> new_tokens;
    std::vector<uint8_t> done;
    while (finished < static_cast<int64_t>(requests.size())) {
      kvsched::StepPlan plan = former.schedule();
      if (plan.req_ids.empty()) {
        std::fprintf(stderr, "step %lld: nothing scheduled with %lld requests unfinished\n",
                     static_cast<long long>(steps), static_cast<long long>(requests.size()) - finished);
        return 1;
      }
      // ... the engine runs the forward pass for plan.req_ids / num_tokens / new_blocks here ...
      ids.assign(plan.req_ids.begin(), plan.req_ids.end());
      new_tokens.assign(ids.size(), 0);
      done.assign(ids.size(), 0);
      for (size_t i = 0; i < ids.size(); ++i) {
        if (!plan.samples[i]) continue;  // a prefill chunk short of the sequence's end
        new_tokens[i] = 1;
        done[i] = ++generated[ids[i]] >= output_len[ids[i]];
      }
      finished += static_cast<int64_t>(former.update(ids.data(), new_tokens.data(), done.data(), ids.size()).size());
      former.check_invariants();
      ++steps;
    }
    kvsched::BatchFormerStats stats = former.stats();
    std::printf("%lld requests finished in %lld steps, %lld preemptions, %lld tokens scheduled\n",
                static_cast<long long>(stats.finished), static_cast<long long>(steps),
                static_cast<long long>(stats.preemptions), static_cast<long long>(stats.scheduled_tokens));
    for (const auto& [id, n] : generated) {
      if (n != output_len[id]) {
        std::fprintf(stderr, "request %lld generated %lld of %lld tokens\n", static_cast<long long>(id),
                     static_cast<long long>(n), static_cast<long long>(output_len[id]));
        return 1;
      }
    }
    return stats.finished == static_cast<int64_t>(requests.size()) ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvsched: %s\n", e.what());
    return 1;
  }
}
