// The kvsched._core extension: one init_<subsystem> per component, plus error types and build info.
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "kvsched/cuda_runtime_info.h"
#include "kvsched/errors.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvsched native core (see the kvsched package for documentation)";
  // OutOfBlocks derives from std::bad_alloc in C++ and MemoryError in Python.
  py::register_exception<kvsched::OutOfBlocks>(m, "OutOfBlocks", PyExc_MemoryError);
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const kvsched::UnknownId& unknown) {
      PyErr_SetString(PyExc_KeyError, unknown.what());
    }
  });
  m.def("cuda_compiled", &kvsched::cuda_compiled, "True when CUDA support was compiled into this build.");
  m.def("cuda_device_count", &kvsched::cuda_device_count, py::call_guard<py::gil_scoped_release>(),
        "Number of usable CUDA devices (0 without a driver, a device or CUDA support).");
  kvsched::bindings::init_allocator(m);
  kvsched::bindings::init_estimator(m);
  kvsched::bindings::init_batch_former(m);
  kvsched::bindings::init_swap(m);
  kvsched::bindings::init_cluster(m);
}
