// Bindings for the swap planner, the host (memcpy) executor and the CUDA copy engine. kvsched.swap
// and kvsched.cuda (Python) wrap them and carry the documentation.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "array_args.h"
#include "bindings.h"
#include "kvsched/copy_descriptors.h"
#include "kvsched/cuda_copy_engine.h"
#include "kvsched/staging_plan.h"
#include "kvsched/swap_planner.h"

namespace kvsched::bindings {
namespace {

using GilRelease = py::gil_scoped_release;

py::dict plan_dict(SwapPlan&& plan) {
  py::dict d;
  d["direction"] = plan.direction == SwapDirection::kOut ? "out" : "in";
  d["seq_ids"] = to_numpy(std::move(plan.seq_ids));
  d["extent_indptr"] = to_numpy(std::move(plan.extent_indptr));
  d["extents"] = to_numpy(std::move(plan.extents)).attr("reshape")(-1, 3);
  d["descriptors"] = to_numpy(std::move(plan.descriptors)).attr("reshape")(-1, 4);
  d["blocks_copied"] = plan.blocks_copied;
  d["blocks_reused"] = plan.blocks_reused;
  d["bytes"] = plan.bytes;
  d["num_descriptors"] = plan.num_descriptors;
  d["estimated_seconds"] = plan.estimated_seconds;
  return d;
}

}  // namespace

py::dict swap_stats_dict(const SwapPlannerStats& s) {
  py::dict d;
  d["num_host_blocks"] = s.num_host_blocks;
  d["num_free_host_blocks"] = s.num_free_host_blocks;
  d["num_resident_copy_blocks"] = s.num_resident_copy_blocks;
  d["num_swapped_blocks"] = s.num_swapped_blocks;
  d["num_swapped"] = s.num_swapped;
  d["num_resident_copies"] = s.num_resident_copies;
  d["swap_outs"] = s.swap_outs;
  d["swap_ins"] = s.swap_ins;
  d["blocks_out"] = s.blocks_out;
  d["blocks_in"] = s.blocks_in;
  d["blocks_reused"] = s.blocks_reused;
  d["bytes_out"] = s.bytes_out;
  d["bytes_in"] = s.bytes_in;
  d["evicted_copies"] = s.evicted_copies;
  d["num_cached_host_blocks"] = s.num_cached_host_blocks;
  d["cache_write_blocks"] = s.cache_write_blocks;
  d["cache_write_bytes"] = s.cache_write_bytes;
  d["cache_load_blocks"] = s.cache_load_blocks;
  d["cache_load_bytes"] = s.cache_load_bytes;
  d["cache_write_skips"] = s.cache_write_skips;
  d["evicted_cached_blocks"] = s.evicted_cached_blocks;
  d["cache_adopted_blocks"] = s.cache_adopted_blocks;
  return d;
}

namespace {

// Descriptors as a private (k, 4) int64 copy: the copy is checked, then executed without the GIL.
py::array_t<int64_t> descriptor_array(py::handle value) { return int64_rows(value, "descriptors", 4); }

// One span per tensor: a sequence of (pointer, nbytes) pairs (the Python layer turns arrays into these).
std::vector<BufferSpan> spans(py::handle value, const char* name) {
  std::vector<BufferSpan> out;
  for (py::handle item : py::iter(value)) {
    auto pair = py::cast<std::pair<uintptr_t, int64_t>>(item);
    if (pair.second < 0) throw py::value_error(std::string(name) + ": negative buffer size");
    out.push_back(BufferSpan{pair.first, pair.second});
  }
  return out;
}

// Block tables in CSR form: one indptr entry per sequence plus one, ending at the block count.
void check_csr(const Int64Array& ids, const Int64Array& indptr, const Int32Array& blocks) {
  if (indptr.size() != ids.size() + 1) throw py::value_error("block_indptr: length must be len(seq_ids) + 1");
  if (indptr.data()[ids.size()] != static_cast<int64_t>(blocks.size())) {
    throw py::value_error("block_indptr: last entry must equal len(device_blocks)");
  }
}

void check_same_count(const std::vector<BufferSpan>& src, const std::vector<BufferSpan>& dst) {
  if (src.size() != dst.size()) {
    throw py::value_error("dst: " + std::to_string(dst.size()) + " buffers for " + std::to_string(src.size()) +
                          " source buffers (one per layout tensor on each side)");
  }
}

SwapPlan plan_out_from_allocator(SwapPlanner& planner, const BlockAllocator& allocator, py::handle seq_ids) {
  Int64Array ids(seq_ids, "seq_ids");
  std::vector<int64_t> tokens, indptr{0};
  std::vector<BlockId> blocks;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::vector<BlockId> table = allocator.block_table(ids.data()[i]);  // UnknownId -> KeyError
    tokens.push_back(allocator.num_tokens(ids.data()[i]));
    blocks.insert(blocks.end(), table.begin(), table.end());
    indptr.push_back(static_cast<int64_t>(blocks.size()));
  }
  GilRelease release;
  return planner.plan_swap_out(ids.data(), tokens.data(), indptr.data(), blocks.data(), ids.size());
}

}  // namespace

void read_swap_options(py::handle layout, py::handle cost, KvLayout& layout_out, SwapCostModel& cost_out) {
  if (!layout.is_none()) {
    // Rows of (block_bytes, device_block_stride, host_block_stride).
    py::array_t<int64_t> rows = int64_rows(layout, "layout", 3);
    auto view = rows.unchecked<2>();
    layout_out.tensors.clear();
    for (py::ssize_t t = 0; t < rows.shape(0); ++t) {
      layout_out.tensors.push_back(KvTensorLayout{view(t, 0), view(t, 1), view(t, 2)});
    }
  }
  if (!cost.is_none()) {
    if (!py::isinstance<py::array>(cost) || std::string("fiu").find(py::reinterpret_borrow<py::array>(cost).dtype().kind()) == std::string::npos) {
      throw py::type_error("cost: expected a numpy float array of shape (2, 3, 3)");
    }
    auto table = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(cost);
    if (!table || table.ndim() != 3 || table.shape(0) != 2 || table.shape(1) != kNumCopyStrategies ||
        table.shape(2) != 3) {
      throw py::value_error("cost: expected shape (2, 3, 3): [direction][strategy][per_call_s, per_descriptor_s, bytes_per_s]");
    }
    auto view = table.unchecked<3>();
    for (int d = 0; d < 2; ++d) {
      for (int s = 0; s < kNumCopyStrategies; ++s) {
        cost_out.cost[d][s] = CopyCost{view(d, s, 0), view(d, s, 1), view(d, s, 2)};
      }
    }
  }
}

py::array_t<double> cost_model_array(const SwapCostModel& model) {
  py::array_t<double> out({2, kNumCopyStrategies, 3});
  auto view = out.mutable_unchecked<3>();
  for (int d = 0; d < 2; ++d) {
    for (int s = 0; s < kNumCopyStrategies; ++s) {
      view(d, s, 0) = model.cost[d][s].per_call_s;
      view(d, s, 1) = model.cost[d][s].per_descriptor_s;
      view(d, s, 2) = model.cost[d][s].bytes_per_s;
    }
  }
  return out;
}

void init_swap(py::module_& m) {
  py::class_<SwapPlanner>(m, "SwapPlanner")
      .def(py::init([](py::handle num_host_blocks_arg, py::handle block_size_arg, py::handle layout,
                       py::handle block_bytes_arg, py::handle tensors_per_block_arg, py::handle reuse_host_copies,
                       py::handle cost) {
             const int64_t num_host_blocks = to_int64(num_host_blocks_arg, "num_host_blocks");
             const int64_t block_size = to_int64(block_size_arg, "block_size");
             const int64_t block_bytes = to_int64(block_bytes_arg, "block_bytes");
             const int64_t tensors_per_block = to_int64(tensors_per_block_arg, "tensors_per_block");
             if (num_host_blocks <= 0 || num_host_blocks >= INT32_MAX) {
               throw py::value_error("num_host_blocks: must be in [1, 2^31 - 2], got " + std::to_string(num_host_blocks));
             }
             if (block_size <= 0 || block_size > INT32_MAX) {
               throw py::value_error("block_size: must be > 0, got " + std::to_string(block_size));
             }
             if (tensors_per_block <= 0 || tensors_per_block > INT32_MAX) {
               throw py::value_error("tensors_per_block: must be > 0, got " + std::to_string(tensors_per_block));
             }
             SwapPlannerOptions o;
             o.num_host_blocks = static_cast<int32_t>(num_host_blocks);
             o.block_size = static_cast<int32_t>(block_size);
             o.block_bytes = block_bytes;
             o.tensors_per_block = static_cast<int32_t>(tensors_per_block);
             o.reuse_host_copies = to_bool(reuse_host_copies, "reuse_host_copies");
             read_swap_options(layout, cost, o.layout, o.cost);
             return std::make_unique<SwapPlanner>(o);
           }),
           py::arg("num_host_blocks"), py::arg("block_size"), py::arg("layout"), py::arg("block_bytes"),
           py::arg("tensors_per_block"), py::arg("reuse_host_copies"), py::arg("cost"))
      .def("plan_swap_out",
           [](SwapPlanner& p, py::handle seq_ids, py::handle num_tokens, py::handle block_indptr, py::handle device_blocks) {
             Int64Array ids(seq_ids, "seq_ids"), tokens(num_tokens, "num_tokens"), indptr(block_indptr, "block_indptr");
             Int32Array blocks(device_blocks, "device_blocks");
             if (tokens.size() != ids.size()) throw py::value_error("num_tokens: length differs from seq_ids");
             check_csr(ids, indptr, blocks);
             SwapPlan plan;
             {
               GilRelease release;
               plan = p.plan_swap_out(ids.data(), tokens.data(), indptr.data(), blocks.data(), ids.size());
             }
             return plan_dict(std::move(plan));
           })
      .def("plan_swap_out_from",
           [](SwapPlanner& p, const BlockAllocator& allocator, py::handle seq_ids) {
             return plan_dict(plan_out_from_allocator(p, allocator, seq_ids));
           })
      .def("plan_swap_in",
           [](SwapPlanner& p, py::handle seq_ids, py::handle block_indptr, py::handle device_blocks, py::handle skip) {
             Int64Array ids(seq_ids, "seq_ids"), indptr(block_indptr, "block_indptr");
             Int32Array blocks(device_blocks, "device_blocks");
             check_csr(ids, indptr, blocks);
             std::optional<Int64Array> skip_blocks;
             if (!skip.is_none()) {
               skip_blocks.emplace(skip, "skip_blocks");
               if (skip_blocks->size() != ids.size()) throw py::value_error("skip_blocks: length differs from seq_ids");
             }
             SwapPlan plan;
             {
               GilRelease release;
               plan = p.plan_swap_in(ids.data(), indptr.data(), blocks.data(),
                                     skip_blocks ? skip_blocks->data() : nullptr, ids.size());
             }
             return plan_dict(std::move(plan));
           })
      .def("release",
           [](SwapPlanner& p, py::handle seq_ids) {
             Int64Array ids(seq_ids, "seq_ids");
             p.release(ids.data(), ids.size());
           })
      // Queries by (seq_id, num_tokens): arguments converted by name (a float or str is refused).
      .def("host_blocks_needed",
           [](const SwapPlanner& p, py::handle id, py::handle tokens) {
             return p.host_blocks_needed(to_int64(id, "seq_id"), to_int64(tokens, "num_tokens"));
           })
      .def("can_swap_out",
           [](const SwapPlanner& p, py::handle id, py::handle tokens) {
             return p.can_swap_out(to_int64(id, "seq_id"), to_int64(tokens, "num_tokens"));
           })
      .def("estimate_round_trip_seconds",
           [](const SwapPlanner& p, py::handle id, py::handle tokens) {
             return p.estimate_round_trip_seconds(to_int64(id, "seq_id"), to_int64(tokens, "num_tokens"));
           })
      .def("is_swapped", [](const SwapPlanner& p, py::handle id) { return p.is_swapped(to_int64(id, "seq_id")); })
      .def("has_host_copy",
           [](const SwapPlanner& p, py::handle id) { return p.has_host_copy(to_int64(id, "seq_id")); })
      .def("num_swapped_tokens",
           [](const SwapPlanner& p, py::handle id) { return p.num_swapped_tokens(to_int64(id, "seq_id")); })
      .def("host_blocks",
           [](const SwapPlanner& p, py::handle id) { return to_numpy(p.host_blocks(to_int64(id, "seq_id"))); })
      .def("stats", [](const SwapPlanner& p) { return swap_stats_dict(p.stats()); })
      .def("cost_model", [](const SwapPlanner& p) { return cost_model_array(p.options().cost); })
      .def("check_invariants", &SwapPlanner::check_invariants);

  m.def("default_swap_cost", [] { return cost_model_array(SwapCostModel{}); });

  m.def(
      "copy_descriptors_host",
      [](py::handle descriptors, py::handle src, py::handle dst) {
        auto rows = descriptor_array(descriptors);
        std::vector<BufferSpan> src_spans = spans(src, "src"), dst_spans = spans(dst, "dst");
        check_same_count(src_spans, dst_spans);
        GilRelease release;
        copy_descriptors_host(rows.data(), static_cast<size_t>(rows.shape(0)), src_spans.data(), dst_spans.data(),
                              src_spans.size());
      },
      py::arg("descriptors"), py::arg("src"), py::arg("dst"));

  // The gather strategy's plan, built on the CPU: for tests and inspection, no GPU needed.
  m.def(
      "staging_plan",
      [](int direction, py::handle descriptors, py::handle src, py::handle dst, uintptr_t staging,
         int64_t staging_bytes) {
        if (direction != 0 && direction != 1) throw py::value_error("direction: must be 0 (out) or 1 (in)");
        auto rows = descriptor_array(descriptors);
        std::vector<BufferSpan> src_spans = spans(src, "src"), dst_spans = spans(dst, "dst");
        check_same_count(src_spans, dst_spans);
        StagingPlan plan;
        {
          GilRelease release;
          check_descriptors(rows.data(), static_cast<size_t>(rows.shape(0)), src_spans.data(), dst_spans.data(),
                            src_spans.size());
          build_staging_plan(static_cast<SwapDirection>(direction), rows.data(), static_cast<size_t>(rows.shape(0)),
                             src_spans.data(), dst_spans.data(), staging, staging_bytes, plan);
        }
        std::vector<int64_t> pieces, runs, chunks;
        for (const StagingPiece& p : plan.pieces) {
          pieces.insert(pieces.end(), {static_cast<int64_t>(p.src), static_cast<int64_t>(p.dst),
                                       static_cast<int64_t>(p.nbytes)});
        }
        for (const StagingRun& r : plan.runs) {
          runs.insert(runs.end(), {r.staging_offset, static_cast<int64_t>(r.host), r.nbytes, r.tensor});
        }
        for (const StagingChunk& c : plan.chunks) {
          chunks.insert(chunks.end(), {static_cast<int64_t>(c.piece_begin), static_cast<int64_t>(c.piece_end),
                                       static_cast<int64_t>(c.run_begin), static_cast<int64_t>(c.run_end), c.slot});
        }
        py::dict d;
        d["pieces"] = to_numpy(std::move(pieces)).attr("reshape")(-1, 3);
        d["runs"] = to_numpy(std::move(runs)).attr("reshape")(-1, 4);
        d["chunks"] = to_numpy(std::move(chunks)).attr("reshape")(-1, 5);
        d["slot_bytes"] = plan.slot_bytes;
        d["piece_bytes"] = plan.piece_bytes;
        d["host_runs"] = count_host_runs(static_cast<SwapDirection>(direction), rows.data(),
                                         static_cast<size_t>(rows.shape(0)), staging_bytes);
        return d;
      },
      py::arg("direction"), py::arg("descriptors"), py::arg("src"), py::arg("dst"), py::arg("staging"),
      py::arg("staging_bytes"));

  // ---- CUDA (each entry raises RuntimeError in a build without nvcc) ----
  py::class_<CopyEvent>(m, "CopyEvent")
      .def("done", &CopyEvent::done)
      .def("wait", &CopyEvent::wait, py::call_guard<GilRelease>())
      .def_property_readonly("handle", &CopyEvent::handle);
  py::class_<CudaCopyEngine>(m, "CudaCopyEngine")
      .def(py::init([](int device, int64_t staging_bytes, py::handle cost, bool batch_staging_copies) {
             SwapCostModel model;
             KvLayout unused;
             read_swap_options(py::none(), cost, unused, model);
             return std::make_unique<CudaCopyEngine>(device, staging_bytes, model, batch_staging_copies);
           }),
           py::arg("device"), py::arg("staging_bytes"), py::arg("cost"), py::arg("batch_staging_copies") = true)
      .def_property_readonly("device", &CudaCopyEngine::device)
      .def_static("batched_supported", &CudaCopyEngine::batched_supported)
      .def("cost_model", [](const CudaCopyEngine& e) { return cost_model_array(e.cost_model()); })
      .def("set_cost_model",
           [](CudaCopyEngine& e, py::handle cost) {
             SwapCostModel model;
             KvLayout unused;
             read_swap_options(py::none(), cost, unused, model);
             e.set_cost_model(model);
           })
      .def("choose",
           [](const CudaCopyEngine& e, int direction, py::handle descriptors) {
             auto rows = descriptor_array(descriptors);
             return static_cast<int>(
                 e.choose(static_cast<SwapDirection>(direction), rows.data(), static_cast<size_t>(rows.shape(0))));
           })
      .def("copy",
           [](CudaCopyEngine& e, int direction, py::handle descriptors, py::handle src, py::handle dst, int strategy,
              uintptr_t stream) {
             auto rows = descriptor_array(descriptors);
             std::vector<BufferSpan> src_spans = spans(src, "src"), dst_spans = spans(dst, "dst");
             check_same_count(src_spans, dst_spans);
             GilRelease release;
             return e.copy(static_cast<SwapDirection>(direction), rows.data(), static_cast<size_t>(rows.shape(0)),
                           src_spans.data(), dst_spans.data(), src_spans.size(), strategy, stream);
           })
      .def("time_copy", [](CudaCopyEngine& e, int direction, py::handle descriptors, py::handle src, py::handle dst,
                           int strategy, int repeats) {
        auto rows = descriptor_array(descriptors);
        std::vector<BufferSpan> src_spans = spans(src, "src"), dst_spans = spans(dst, "dst");
        check_same_count(src_spans, dst_spans);
        GilRelease release;
        return e.time_copy(static_cast<SwapDirection>(direction), rows.data(), static_cast<size_t>(rows.shape(0)),
                           src_spans.data(), dst_spans.data(), src_spans.size(), strategy, repeats);
      });
  m.def("cuda_memory_kind", [](uintptr_t ptr) {
    int device = -1;
    int kind = static_cast<int>(cuda_memory_kind(ptr, &device));
    return std::make_pair(kind, device);
  });
  m.def("cuda_host_alloc", &cuda_host_alloc);
  m.def("cuda_host_free", &cuda_host_free);
  m.def("cuda_host_register", &cuda_host_register);
  m.def("cuda_host_unregister", &cuda_host_unregister);
}

}  // namespace kvsched::bindings
