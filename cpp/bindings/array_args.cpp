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
  // A private copy: the native call validates and applies the same values (and releases the GIL
  // meanwhile), so another thread rewriting the caller's array can change nothing it has checked.
  // numpy.array(subok=False) copies in C: a subclass cannot override the copy (or astype, min and
  // max, which the checks below call on the copy).
  return py::module_::import("numpy").attr("array")(array, py::arg("copy") = true, py::arg("subok") = false);
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
  return array.attr("astype")(py::dtype::of<T>(), py::arg("copy") = false);
}

}  // namespace

int64_t to_int64(py::handle value, const char* name) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be an int, got " + describe_type(value));
  }
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) {  // e.g. a numpy array of several values, or an __index__ that raises
    PyErr_Clear();
    throw py::type_error(std::string(name) + " must be an int, got " + describe_type(value));
  }
  int overflow = 0;
  long long result = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) throw py::value_error(std::string(name) + " does not fit in int64: " + std::string(py::str(index)));
  return static_cast<int64_t>(result);
}

int32_t to_int32(py::handle value, const char* name) {
  const int64_t v = to_int64(value, name);
  if (v < INT32_MIN || v > INT32_MAX) throw py::value_error(std::string(name) + " does not fit in int32: " + std::to_string(v));
  return static_cast<int32_t>(v);
}

double to_double(py::handle value, const char* name) {
  // Python and numpy ints and floats; bool and str are refused rather than read as 1.0 or parsed.
  if (PyBool_Check(value.ptr()) || py::isinstance(value, py::module_::import("numpy").attr("bool_")) ||
      !(PyFloat_Check(value.ptr()) || PyIndex_Check(value.ptr()) ||
        py::isinstance(value, py::module_::import("numpy").attr("floating")))) {
    throw py::type_error(std::string(name) + " must be a number, got " + describe_type(value));
  }
  double result = PyFloat_AsDouble(value.ptr());
  if (result == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + " does not fit in a float: " + std::string(py::repr(value)));
  }
  return result;
}

bool to_bool(py::handle value, const char* name) {
  if (PyBool_Check(value.ptr())) return value.ptr() == Py_True;
  if (py::isinstance(value, py::module_::import("numpy").attr("bool_"))) return PyObject_IsTrue(value.ptr()) == 1;
  throw py::type_error(std::string(name) + " must be a bool, got " + describe_type(value));
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

OutputLengthArgs::OutputLengthArgs(py::handle lengths_arg, py::handle class_ids) : lengths(lengths_arg, "lengths") {
  if (class_ids.is_none()) return;
  classes.emplace(class_ids, "class_ids");
  if (classes->size() != lengths.size()) throw py::value_error("class_ids must have the same length as lengths");
}

Float64Array::Float64Array(py::handle value, const char* name) {
  owner_ = checked_array(value, name, 1, "fiu", "float");
  if (!owner_.dtype().is(py::dtype::of<double>())) {
    owner_ = owner_.attr("astype")(py::dtype::of<double>(), py::arg("copy") = false);
  }
  data_ = static_cast<const double*>(owner_.data());
  size_ = static_cast<size_t>(owner_.size());
}

FlagArray::FlagArray(py::handle value, const char* name) {
  owner_ = checked_array(value, name, 1, "biu", "bool");
  if (owner_.dtype().kind() != 'b' && owner_.size() > 0) {
    py::int_ min(owner_.attr("min")()), max(owner_.attr("max")()), zero(0), one(1);
    if (PyObject_RichCompareBool(min.ptr(), zero.ptr(), Py_LT) == 1 ||
        PyObject_RichCompareBool(max.ptr(), one.ptr(), Py_GT) == 1) {
      throw py::value_error(std::string(name) + " must hold only 0 and 1 (or be a bool array)");
    }
  }
  if (!owner_.dtype().is(py::dtype::of<uint8_t>())) {
    owner_ = owner_.attr("astype")(py::dtype::of<uint8_t>(), py::arg("copy") = false);
  }
  data_ = static_cast<const uint8_t*>(owner_.data());
  size_ = static_cast<size_t>(owner_.size());
}

py::array_t<int64_t> int64_rows(py::handle value, const char* name, py::ssize_t columns) {
  py::array array = checked_integer_array(value, name, 2);
  if (array.shape(1) != columns) {
    throw py::value_error(std::string(name) + " must have shape (k, " + std::to_string(columns) + "), got " +
                          std::string(py::str(py::tuple(array.attr("shape")))));
  }
  if (!array.dtype().is(py::dtype::of<int64_t>())) array = convert_checked<int64_t>(array, name);
  return py::array_t<int64_t>(array);
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
