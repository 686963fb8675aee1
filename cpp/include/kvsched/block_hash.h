// Content keys for prefix caching.
//
// A full block's key is chained over the whole prefix: key_i = H(key_{i-1}, tokens of block i), with
// key_{-1} = {salt, 0}. Equal keys therefore mean equal token prefixes (and equal salt), not just an
// equal block. Keys are 128 bits. Two functions:
//   kFast128 (default): two independent 64-bit multiply-xorshift lanes over the token words; not
//                        cryptographic, about 2^-128 chance that two given prefixes collide.
//   kSha256:            SHA-256 (FIPS 180-4) of (parent key || tokens), truncated to 128 bits; use it
//                        when prompts come from untrusted users who could craft collisions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace kvsched {

struct Hash128 {
  uint64_t lo = 0;
  uint64_t hi = 0;
  bool operator==(const Hash128& other) const { return lo == other.lo && hi == other.hi; }
  bool operator!=(const Hash128& other) const { return !(*this == other); }
};

struct Hash128Hasher {
  size_t operator()(const Hash128& h) const noexcept { return static_cast<size_t>(h.lo ^ (h.hi * 0x9e3779b97f4a7c15ULL)); }
};

enum class HashAlgorithm : int { kFast128 = 0, kSha256 = 1 };

// Root of a chain: requests with different salts (LoRA adapter, tenant, cache salt) never share blocks.
inline Hash128 chain_root(uint64_t salt) { return Hash128{salt, 0}; }

// Key of one block whose parent key is `parent`.
Hash128 hash_block(HashAlgorithm algorithm, const Hash128& parent, const int32_t* tokens, size_t num_tokens);

// Keys of the `num_tokens / block_size` full blocks of a token sequence, written to `out`.
void hash_full_blocks(HashAlgorithm algorithm, uint64_t salt, const int32_t* tokens, size_t num_tokens,
                      int32_t block_size, Hash128* out);

// SHA-256 of a byte string (exposed for tests against a reference implementation).
void sha256(const uint8_t* data, size_t size, uint8_t digest[32]);

}  // namespace kvsched
