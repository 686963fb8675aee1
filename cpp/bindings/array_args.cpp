#include "array_args.h"

#include <limits>

namespace kvsched::bindings {
namespace {

std::string describe_type(py::handle value) { return py::str(py::type::of(value).attr("__name__")); }

// Checks ndim/contiguity/kind and returns the array (converted from lists/tuples when needed).
// `kinds` lists the accepted numpy dtype kinds.
py::array checked_array(py::handle value, const char* name, int ndim, const std::string& kinds,
                        const std::string& noun) {
  py::array array;
  if (py::isinstance<py::array>(value)) {
    array = py::reinterpret_borrow<py::array>(value);
  } else if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value)) {
    array = py::module_::import("numpy").attr("asarray")(value);
    if (array.size() == 0) array = py::array_t<int64_t>(std::vector<py::ssize_t>(static_cast<size_t>(ndim < 0 ? 1 : ndim), 0));
  } else {
    throw py::type_error(std::string(name) + " must be a numpy " + noun + " array, got " + describe_type(value));
  }
  if (kinds.find(array.dtype().kind()) == std::string::npos) {
    throw py::type_error(std::string(name) + " must have " + (noun[0] == 'i' ? "an " : "a ") + noun + " dtype, got " +
                         std::string(py::str(array.dtype())));
  }
  if (ndim >= 0 && array.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " +
                          std::string(py::str(py::tuple(array.attr("shape")))));
  }
  if (!(array.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
  }
  return array;
}

py::array checked_integer_array(py::handle value, const char* name, int ndim) {
  return checked_array(value, name, ndim, "iu", "integer");
}

// Converts an integer array to dtype T, raising ValueError when a value does not fit.
template <typename T>
py::array convert_checked(const py::array& array, const char* name) {
  if (array.size() > 0) {
    py::int_ min(array.attr("min")()), max(array.attr("max")());
    py::int_ lowest(std::numeric_limits<T>::min()), highest(std::numeric_limits<T>::max());
    bool fits = PyObject_RichCompareBool(min.ptr(), lowest.ptr(), Py_GE) == 1 &&
                PyObject_RichCompareBool(max.ptr(), highest.ptr(), Py_LE) == 1;
    if (!fits) {
      throw py::value_error(std::string(name) + " has values outside the range of " +
                            std::string(py::str(py::dtype::of<T>())) + ": [" + std::string(py::str(min)) + ", " +
                            std::string(py::str(max)) + "]");
    }
  }
  return array.attr("astype")(py::dtype::of<T>());
}

}  // namespace

int64_t to_int64(py::handle value, const char* name) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be an int, got " + describe_type(value));
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  long long result = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) throw py::value_error(std::string(name) + " does not fit in int64: " + std::string(py::str(index)));
  return static_cast<int64_t>(result);
}

Int64Array::Int64Array(py::handle value, const char* name) {
  owner_ = checked_integer_array(value, name, 1);
  if (!owner_.dtype().is(py::dtype::of<int64_t>())) owner_ = convert_checked<int64_t>(owner_, name);
  data_ = static_cast<const int64_t*>(owner_.data());
  size_ = static_cast<size_t>(owner_.size());
}

Int32Array::Int32Array(py::handle value, const char* name) {
  owner_ = checked_integer_array(value, name, 1);
  if (!owner_.dtype().is(py::dtype::of<int32_t>())) owner_ = convert_checked<int32_t>(owner_, name);
  data_ = static_cast<const int32_t*>(owner_.data());
  size_ = static_cast<size_t>(owner_.size());
}

Float64Array::Float64Array(py::handle value, const char* name) {
  owner_ = checked_array(value, name, 1, "fiu", "float");
  if (!owner_.dtype().is(py::dtype::of<double>())) owner_ = owner_.attr("astype")(py::dtype::of<double>());
  data_ = static_cast<const double*>(owner_.data());
  size_ = static_cast<size_t>(owner_.size());
}

FlagArray::FlagArray(py::handle value, const char* name) {
  owner_ = checked_array(value, name, 1, "biu", "bool");
  if (owner_.dtype().kind() != 'b' && owner_.size() > 0) {
    py::int_ min(owner_.attr("min")()), max(owner_.attr("max")());
    if (py::cast<int64_t>(min) < 0 || py::cast<int64_t>(max) > 1) {
      throw py::value_error(std::string(name) + " must hold only 0 and 1 (or be a bool array)");
    }
  }
  if (!owner_.dtype().is(py::dtype::of<uint8_t>())) owner_ = owner_.attr("astype")(py::dtype::of<uint8_t>());
  data_ = static_cast<const uint8_t*>(owner_.data());
  size_ = static_cast<size_t>(owner_.size());
}

KeyArray::KeyArray(py::handle value, const char* name) {
  py::array array = checked_integer_array(value, name, -1);
  if (!(array.ndim() == 1 || (array.ndim() == 2 && array.shape(1) == 2))) {
    throw py::value_error(std::string(name) + " must have shape (n, 2) or (n,), got " +
                          std::string(py::str(py::tuple(array.attr("shape")))));
  }
  if (!array.dtype().is(py::dtype::of<uint64_t>())) {
    throw py::type_error(std::string(name) + " must have dtype uint64, got " + std::string(py::str(array.dtype())));
  }
  size_t n = static_cast<size_t>(array.shape(0));
  keys_.resize(n);
  const uint64_t* words = static_cast<const uint64_t*>(array.data());
  for (size_t i = 0; i < n; ++i) {
    keys_[i] = array.ndim() == 2 ? Hash128{words[2 * i], words[2 * i + 1]} : Hash128{words[i], 0};
  }
}

}  // namespace kvsched::bindings
