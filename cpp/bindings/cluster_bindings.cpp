// Bindings for the cluster dispatcher (kvsched/dispatch.h); kvsched.cluster wraps them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "array_args.h"
#include "bindings.h"
#include "kvsched/dispatch.h"
#include "kvsched/limits.h"

#include <cmath>
#include <optional>

namespace kvsched::bindings {

void init_cluster(py::module_& m) {
  m.def(
      "dispatch",
      [](int policy, py::handle available, py::handle load_tokens, py::handle headroom_blocks,
         py::handle capacity_tokens, py::handle request_tokens, py::handle request_blocks, py::handle prefix_hits,
         double imbalance_limit, int64_t round_robin_next, bool global_queue) {
        if (policy < 0 || policy > 3) throw py::value_error("policy must be in [0, 3], got " + std::to_string(policy));
        FlagArray up(available, "available");
        Int64Array load(load_tokens, "load_tokens"), headroom(headroom_blocks, "headroom_blocks"),
            capacity(capacity_tokens, "capacity_tokens"), tokens(request_tokens, "request_tokens"),
            blocks(request_blocks, "request_blocks");
        const size_t n = up.size(), r = tokens.size();
        auto expect = [](size_t got, size_t want, const char* name) {
          if (got != want) {
            throw py::value_error(std::string(name) + " has " + std::to_string(got) + " entries, expected " +
                                  std::to_string(want));
          }
        };
        expect(load.size(), n, "load_tokens");
        expect(headroom.size(), n, "headroom_blocks");
        expect(capacity.size(), n, "capacity_tokens");
        if (blocks.size() != r) {
          throw py::value_error("request_blocks has " + std::to_string(blocks.size()) + " entries and request_tokens " +
                                std::to_string(r) + ": one each per request");
        }
        if (!(imbalance_limit >= 0.0) || !std::isfinite(imbalance_limit)) {
          throw py::value_error("imbalance_limit must be finite and >= 0, got " + std::to_string(imbalance_limit));
        }
        auto non_negative = [](const int64_t* values, size_t count, const char* name) {
          for (size_t i = 0; i < count; ++i) {
            if (values[i] < 0) {
              throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] must be >= 0, got " +
                                    std::to_string(values[i]));
            }
          }
        };
        // Bounds that keep the sums dispatch() forms (a load plus a batch's tokens) inside int64.
        constexpr int64_t kMaxLoad = int64_t{1} << 60, kMaxBatch = int64_t{1} << 20;
        auto within = [](const int64_t* values, size_t count, const char* name, int64_t low, int64_t high) {
          for (size_t i = 0; i < count; ++i) {
            if (values[i] < low || values[i] > high) {
              throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] must be in [" +
                                    std::to_string(low) + ", " + std::to_string(high) + "], got " +
                                    std::to_string(values[i]));
            }
          }
        };
        if (static_cast<int64_t>(r) > kMaxBatch) {
          throw py::value_error("request_tokens: at most " + std::to_string(kMaxBatch) + " requests per call, got " +
                                std::to_string(r));
        }
        within(tokens.data(), r, "request_tokens", 0, kMaxRequestTokens);
        within(blocks.data(), r, "request_blocks", 0, kMaxRequestTokens);
        within(load.data(), n, "load_tokens", 0, kMaxLoad);
        within(headroom.data(), n, "headroom_blocks", -kMaxLoad, kMaxLoad);
        within(capacity.data(), n, "capacity_tokens", 0, kMaxLoad);
        std::optional<py::array_t<int64_t>> hits;
        if (!prefix_hits.is_none()) {
          hits = int64_rows(prefix_hits, "prefix_hits", static_cast<py::ssize_t>(n));  // requests x instances
          if (static_cast<size_t>(hits->shape(0)) != r) {
            throw py::value_error("prefix_hits must have shape (requests, instances) = (" + std::to_string(r) + ", " +
                                  std::to_string(n) + "), got (" + std::to_string(hits->shape(0)) + ", " +
                                  std::to_string(n) + ")");
          }
          non_negative(hits->data(), n * r, "prefix_hits");
        }
        DispatchInput in;
        in.num_instances = n;
        in.num_requests = r;
        in.available = up.data();
        in.load_tokens = load.data();
        in.headroom_blocks = headroom.data();
        in.capacity_tokens = capacity.data();
        in.request_tokens = tokens.data();
        in.request_blocks = blocks.data();
        in.prefix_hits = hits ? hits->data() : nullptr;
        in.imbalance_limit = imbalance_limit;
        in.global_queue = global_queue;
        std::vector<int32_t> placed;
        {
          py::gil_scoped_release release;
          placed = dispatch(static_cast<DispatchPolicy>(policy), in, round_robin_next);
        }
        return py::make_tuple(to_numpy(std::move(placed)), round_robin_next);
      },
      py::arg("policy"), py::arg("available"), py::arg("load_tokens"), py::arg("headroom_blocks"),
      py::arg("capacity_tokens"), py::arg("request_tokens"), py::arg("request_blocks"), py::arg("prefix_hits"),
      py::arg("imbalance_limit"), py::arg("round_robin_next"), py::arg("global_queue") = false,
      "Places requests on instances (kvsched/dispatch.h); returns (instance per request, -1 for one held, and the "
      "next round-robin cursor).");
}

}  // namespace kvsched::bindings
