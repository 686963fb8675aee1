// One init function per subsystem; module.cpp calls them in order.
#pragma once

#include <pybind11/pybind11.h>

namespace kvsched::bindings {

void init_allocator(pybind11::module_& m);
void init_estimator(pybind11::module_& m);
void init_batch_former(pybind11::module_& m);

}  // namespace kvsched::bindings
