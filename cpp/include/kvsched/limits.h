// Bounds on values that enter kvsched from its callers. Each bound keeps the sums the core
// computes (a request's tokens, added over every live request, times a request count) inside
// int64, or keeps a knob whose cost grows with it cheap. A value past a bound is refused where it
// enters, with an error that names the argument and the bound.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvsched {

// Any token count of one request: prompt length, max_new_tokens, tokens held or to come.
// 2^40 tokens (10^12) times 2^22 requests still fits in int64.
// 128-bit integers for the few sums that could pass int64 before they are checked (GCC and Clang).
__extension__ using Int128 = __int128;

inline constexpr int64_t kMaxRequestTokens = int64_t{1} << 40;
// Bytes of one KV block (all its tensors together), and any tensor's block stride: block ids
// (< 2^31) times this stay below 2^62, so offsets and the bytes of a plan fit in int64.
inline constexpr int64_t kMaxBlockBytes = int64_t{1} << 31;
// past_future's scenarios: each one costs a sort of the batch per admission.
inline constexpr int32_t kMaxScenarios = 64;
// Finished output lengths kept per history (its memory is proportional).
inline constexpr int32_t kMaxWindow = 1 << 20;
// Per-class output-length histories kept at once; past it the class recorded least recently is
// forgotten (its requests fall back on the pooled history), so memory follows live classes.
inline constexpr size_t kMaxClassHistories = 1024;

}  // namespace kvsched
