// One init function per subsystem; module.cpp calls them in order.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "kvsched/block_allocator.h"
#include "kvsched/swap_planner.h"

namespace kvsched::bindings {

void init_allocator(pybind11::module_& m);
void init_estimator(pybind11::module_& m);
void init_batch_former(pybind11::module_& m);
void init_swap(pybind11::module_& m);
void init_cluster(pybind11::module_& m);

// The swap layout, rows of (block_bytes, device_block_stride, host_block_stride), and the swap cost
// table, shape (2, 3, 3); None leaves the default. Shared by the swap and batch former bindings.
void read_swap_options(pybind11::handle layout, pybind11::handle cost, KvLayout& layout_out, SwapCostModel& cost_out);
pybind11::array_t<double> cost_model_array(const SwapCostModel& model);
pybind11::dict swap_stats_dict(const SwapPlannerStats& stats);

// BlockAllocator::stats() as a dict; shared by the allocator and the batch former bindings.
pybind11::dict allocator_stats_dict(const BlockAllocatorStats& stats);
// Keys as an (n, 2) uint64 array of (lo, hi) words, the form KeyArray reads back.
pybind11::array_t<uint64_t> keys_to_numpy(const std::vector<Hash128>& keys);

}  // namespace kvsched::bindings
