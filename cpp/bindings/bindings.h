// One init function per subsystem; module.cpp calls them in order.
#pragma once

#include <pybind11/pybind11.h>

#include "kvsched/block_allocator.h"

namespace kvsched::bindings {

void init_allocator(pybind11::module_& m);
void init_estimator(pybind11::module_& m);
void init_batch_former(pybind11::module_& m);

// BlockAllocator::stats() as a dict; shared by the allocator and the batch former bindings.
pybind11::dict allocator_stats_dict(const BlockAllocatorStats& stats);

}  // namespace kvsched::bindings
