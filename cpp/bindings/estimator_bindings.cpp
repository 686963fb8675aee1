// Bindings for kvsched::PeakEstimator; kvsched.PeakEstimator (Python) wraps and documents them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "array_args.h"
#include "bindings.h"
#include "kvsched/peak_estimator.h"

namespace kvsched::bindings {
namespace {

// Owns the converted arrays of one request set and exposes them as RequestArrays.
struct RequestSet {
  std::optional<Int64Array> held, generated, max_new_tokens, known_lengths, ids;
  std::optional<Int32Array> class_ids;
  RequestArrays view;
  std::string held_label;

  RequestSet(const std::string& prefix, py::handle held_in, const char* held_name, py::handle generated_in,
             py::handle max_new_in, py::handle class_ids_in, py::handle known_in, py::handle ids_in) {
    held_label = prefix + held_name;
    std::string max_label = prefix + "max_new_tokens";
    held.emplace(held_in, held_label.c_str());
    max_new_tokens.emplace(max_new_in, max_label.c_str());
    view.count = held->size();
    view.held = held->data();
    view.max_new_tokens = max_new_tokens->data();
    check_length(max_label, max_new_tokens->size());
    view.generated = optional_array(generated, generated_in, prefix + "generated");
    view.class_ids = optional_array(class_ids, class_ids_in, prefix + "class_ids");
    view.known_lengths = optional_array(known_lengths, known_in, prefix + "lengths");
    view.draw_keys = optional_array(ids, ids_in, prefix + "ids");
  }

  // Converts an optional argument of one entry per request; null when it is None.
  template <typename Array>
  auto optional_array(std::optional<Array>& slot, py::handle given, const std::string& label) -> decltype(slot->data()) {
    if (given.is_none()) return nullptr;
    slot.emplace(given, label.c_str());
    check_length(label, slot->size());
    return slot->data();
  }

  void check_length(const std::string& label, size_t size) const {
    if (size != view.count) {
      throw py::value_error(label + " has " + std::to_string(size) + " entries, " + held_label + " has " +
                            std::to_string(view.count) + ": one each per request");
    }
  }
};

}  // namespace

void init_estimator(py::module_& m) {
  m.def(
      "future_peak",
      [](py::handle held, py::handle remaining, py::handle block_size_arg) {
        const int64_t block_size = to_int64(block_size_arg, "block_size");
        // The block count's scratch grows with block_size: the PeakEstimator's bound.
        if (block_size > 65536) throw py::value_error("block_size must be in [0, 65536], got " + std::to_string(block_size));
        Int64Array held_array(held, "held"), remaining_array(remaining, "remaining");
        if (held_array.size() != remaining_array.size()) {
          throw py::value_error("held and remaining must have the same length");
        }
        for (size_t i = 0; i < held_array.size(); ++i) {
          if (held_array.data()[i] < 0 || remaining_array.data()[i] < 0) {
            throw py::value_error("held and remaining must be >= 0 (index " + std::to_string(i) + ")");
          }
        }
        if (block_size < 0) throw py::value_error("block_size must be >= 0");
        py::gil_scoped_release release;
        return future_peak(held_array.data(), remaining_array.data(), held_array.size(),
                           static_cast<int32_t>(block_size));
      },
      py::arg("held"), py::arg("remaining"), py::arg("block_size") = 0);

  py::class_<PeakEstimator>(m, "PeakEstimator")
      .def(py::init([](py::handle window, py::handle block_size, py::handle quantile, py::handle adaptive,
                       py::handle target_rate, py::handle adapt_gain, py::handle min_quantile, py::handle max_quantile,
                       py::handle sampling, py::handle num_scenarios, py::handle keyed_draws, py::handle seed,
                       py::handle prior, py::handle overflow_scenarios) {
             // Ranges are the PeakEstimator constructor's checks; here only types, each by name.
             PeakEstimatorOptions options;
             options.window = to_int32(window, "window");
             options.block_size = to_int32(block_size, "block_size");
             options.quantile = to_double(quantile, "quantile");
             options.adaptive = to_bool(adaptive, "adaptive");
             options.target_preemption_rate = to_double(target_rate, "target_preemption_rate");
             options.adapt_gain = to_double(adapt_gain, "adapt_gain");
             options.min_quantile = to_double(min_quantile, "min_quantile");
             options.max_quantile = to_double(max_quantile, "max_quantile");
             options.sampling = to_bool(sampling, "sampling");
             options.num_scenarios = to_int32(num_scenarios, "num_scenarios");
             options.overflow_scenarios = to_int32(overflow_scenarios, "overflow_scenarios");
             options.keyed_draws = to_bool(keyed_draws, "keyed_draws");
             int64_t seed_value = to_int64(seed, "seed");
             if (seed_value < 0) throw py::value_error("seed must be >= 0, got " + std::to_string(seed_value));
             options.seed = static_cast<uint64_t>(seed_value);
             if (!prior.is_none()) {
               Int64Array values(prior, "prior");
               options.prior.assign(values.data(), values.data() + values.size());
             }
             return new PeakEstimator(std::move(options));
           }),
           py::arg("window"), py::arg("block_size"), py::arg("quantile"), py::arg("adaptive"),
           py::arg("target_preemption_rate"), py::arg("adapt_gain"), py::arg("min_quantile"), py::arg("max_quantile"),
           py::arg("sampling"), py::arg("num_scenarios"), py::arg("keyed_draws"), py::arg("seed"), py::arg("prior"),
           py::arg("overflow_scenarios") = 0)
      .def_property_readonly("quantile", &PeakEstimator::quantile)
      .def_property_readonly("block_size", [](const PeakEstimator& e) { return e.options().block_size; })
      .def(
          "history_size",
          [](const PeakEstimator& e, py::handle class_id) {
            int64_t id = to_int64(class_id, "class_id");
            if (id < -1 || id > INT32_MAX) throw py::value_error("class_id must be in [-1, 2**31 - 1], got " + std::to_string(id));
            return e.history_size(static_cast<int32_t>(id));
          },
          py::arg("class_id") = -1)
      .def(
          "record",
          [](PeakEstimator& e, py::handle lengths, py::handle class_ids) {
            const OutputLengthArgs args(lengths, class_ids);
            e.record(args.lengths.data(), args.class_data(), args.lengths.size());
          },
          py::arg("lengths"), py::arg("class_ids") = py::none())
      .def(
          "predict_remaining",
          [](PeakEstimator& e, int mode, py::handle generated, py::handle max_new, py::handle class_ids,
             py::handle lengths, py::handle ids) {
            RequestSet requests("", generated, "generated", generated, max_new, class_ids, lengths, ids);
            std::vector<int64_t> out(requests.view.count);
            {
              py::gil_scoped_release release;
              e.predict_remaining(static_cast<AdmissionMode>(mode), requests.view, out.data());
            }
            return to_numpy(std::move(out));
          },
          py::arg("mode"), py::arg("generated"), py::arg("max_new_tokens"), py::arg("class_ids"), py::arg("lengths"),
          py::arg("ids"))
      .def(
          "admit",
          [](PeakEstimator& e, int mode, py::handle capacity_arg, py::handle reserve_arg, py::handle running_held,
             py::handle running_generated, py::handle running_max_new, py::handle running_classes,
             py::handle running_lengths, py::handle running_ids, py::handle candidate_prompt,
             py::handle candidate_max_new, py::handle candidate_classes, py::handle candidate_lengths,
             py::handle candidate_ids) {
            const int64_t capacity = to_int64(capacity_arg, "capacity"), reserve = to_int64(reserve_arg, "reserve");
            RequestSet running("running_", running_held, "held", running_generated, running_max_new, running_classes,
                               running_lengths, running_ids);
            RequestSet candidates("candidate_", candidate_prompt, "prompt", py::none(), candidate_max_new,
                                  candidate_classes, candidate_lengths, candidate_ids);
            py::gil_scoped_release release;
            return e.admit(static_cast<AdmissionMode>(mode), running.view, candidates.view, capacity, reserve);
          })
      .def(
          "observe",
          [](PeakEstimator& e, py::handle preempted, py::handle admitted) {
            e.observe(to_int64(preempted, "preempted"), to_int64(admitted, "admitted"));
          },
          py::arg("preempted"), py::arg("admitted"));
}

}  // namespace kvsched::bindings
