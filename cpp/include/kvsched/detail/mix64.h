// A 64-bit bijective finalizer (xorshift-multiply, splitmix64's constants): spreads every input
// bit over the whole word. Block hashing and keyed draws both use it.
#pragma once

#include <cstdint>

namespace kvsched::detail {

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace kvsched::detail
