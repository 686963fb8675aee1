// Error types and argument checks for the kvsched core.
//
// Every user-facing error derives from the matching standard type so that the bindings need no
// translation code beyond the two kvsched-specific types:
//   std::invalid_argument -> ValueError     (bad value, duplicate id, wrong size)
//   UnknownId             -> KeyError       (an id the structure has never seen, or no longer holds)
//   OutOfBlocks           -> OutOfBlocks    (a MemoryError: capacity, an expected condition)
//   std::logic_error      -> RuntimeError   (a broken internal invariant: a kvsched bug)
// A failing call never changes state: checks run before the first mutation.
#pragma once

#include <new>
#include <sstream>
#include <stdexcept>
#include <string>

namespace kvsched {

// Not enough free blocks for the request. Raised with no state change.
class OutOfBlocks : public std::bad_alloc {
 public:
  explicit OutOfBlocks(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

// An id that is not known to the structure it was passed to.
class UnknownId : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

namespace detail {
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

}  // namespace kvsched

// Check user input: throws `error_type` with the message parts concatenated. Messages start with
// the name of the offending argument so that the Python user sees which one was wrong.
#define KVSCHED_EXPECTS(condition, error_type, ...)                                   \
  do {                                                                                \
    if (!(condition)) throw error_type(::kvsched::detail::concat(__VA_ARGS__));       \
  } while (0)

// Internal invariant: a failure is a kvsched bug, reported with file and line.
#define KVSCHED_ASSERT(condition, ...)                                                \
  do {                                                                                \
    if (!(condition))                                                                 \
      throw std::logic_error(::kvsched::detail::concat(                               \
          "kvsched internal invariant failed at ", __FILE__, ":", __LINE__, ": ",     \
          #condition, ": ", __VA_ARGS__));                                            \
  } while (0)
