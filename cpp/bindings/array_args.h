// Conversion of Python arguments for the bindings: scalars and numpy arrays are checked here so
// that every error names the argument. Integer arrays of another width are converted (with a range
// check); float, bool or object arrays are a TypeError; non-contiguous or wrongly shaped arrays are a
// ValueError. Every array is a private copy of the caller's: native calls release the GIL, and a
// caller's thread that rewrites its array meanwhile must not change what was validated. Only
// bindings include this file.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kvsched/block_hash.h"

namespace kvsched::bindings {

namespace py = pybind11;

// A Python int (or numpy integer); bools and floats are rejected.
int64_t to_int64(py::handle value, const char* name);

// to_int64, range-checked to int32 (class, client and LoRA ids).
int32_t to_int32(py::handle value, const char* name);

// A Python or numpy int or float (not bool, not str) as a double; range checks are the caller's.
double to_double(py::handle value, const char* name);

// A Python or numpy bool; 0/1 and other truthy values are refused.
bool to_bool(py::handle value, const char* name);

// A 1-D C-contiguous integer array, copied as int64.
class Int64Array {
 public:
  Int64Array(py::handle value, const char* name);
  const int64_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  py::array owner_;
  const int64_t* data_ = nullptr;
  size_t size_ = 0;
};

// A 1-D C-contiguous integer array viewed as int32 (token ids, class ids), range-checked.
class Int32Array {
 public:
  Int32Array(py::handle value, const char* name);
  const int32_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  py::array owner_;
  const int32_t* data_ = nullptr;
  size_t size_ = 0;
};

// A 1-D C-contiguous float or integer array viewed as float64 (times, policy keys).
class Float64Array {
 public:
  Float64Array(py::handle value, const char* name);
  const double* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  py::array owner_;
  const double* data_ = nullptr;
  size_t size_ = 0;
};

// A 1-D C-contiguous bool array (or integers that are all 0 or 1) viewed as uint8 flags.
class FlagArray {
 public:
  FlagArray(py::handle value, const char* name);
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  py::array owner_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Finished output lengths and, optionally (None: class 0), one class id per length: what an
// estimator learns from.
struct OutputLengthArgs {
  OutputLengthArgs(py::handle lengths, py::handle class_ids);
  const int32_t* class_data() const { return classes ? classes->data() : nullptr; }
  Int64Array lengths;
  std::optional<Int32Array> classes;
};

// A C-contiguous integer array of shape (k, columns), copied as int64 (copy descriptors).
py::array_t<int64_t> int64_rows(py::handle value, const char* name, py::ssize_t columns);

// Block keys: uint64 array of shape (n, 2) as (lo, hi) pairs, or shape (n,) of 64-bit keys (hi = 0).
class KeyArray {
 public:
  KeyArray(py::handle value, const char* name);
  const Hash128* data() const { return keys_.empty() ? nullptr : keys_.data(); }
  size_t size() const { return keys_.size(); }

 private:
  std::vector<Hash128> keys_;
};

// Moves a vector into a numpy array without copying (the array owns the buffer).
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values) {
  auto* owned = new std::vector<T>(std::move(values));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        owned->data(), free_when_done);
}

}  // namespace kvsched::bindings
