#include "kvsched/block_hash.h"

#include <array>
#include <cstring>
#include <vector>

#include "kvsched/detail/mix64.h"

namespace kvsched {
namespace {

inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// Two 64-bit bijective finalizers with unrelated constants (xorshift-multiply), one per lane.
inline uint64_t mix_lane0(uint64_t x) { return detail::mix64(x); }
inline uint64_t mix_lane1(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  return x ^ (x >> 33);
}

Hash128 fast128(const Hash128& parent, const int32_t* tokens, size_t num_tokens) {
  uint64_t lane0 = parent.lo ^ 0x243f6a8885a308d3ULL;
  uint64_t lane1 = parent.hi ^ 0x13198a2e03707344ULL;
  size_t i = 0;
  for (; i + 2 <= num_tokens; i += 2) {
    uint64_t word = static_cast<uint32_t>(tokens[i]) | (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i + 1])) << 32);
    lane0 = mix_lane0(lane0 ^ word);
    lane1 = mix_lane1(lane1 + rotl64(word, 32) + 0x9e3779b97f4a7c15ULL);
  }
  if (i < num_tokens) {
    uint64_t word = static_cast<uint32_t>(tokens[i]) | (0xa5a5a5a5ULL << 32);
    lane0 = mix_lane0(lane0 ^ word);
    lane1 = mix_lane1(lane1 + rotl64(word, 32) + 0x9e3779b97f4a7c15ULL);
  }
  lane0 = mix_lane0(lane0 ^ num_tokens);
  lane1 = mix_lane1(lane1 ^ (num_tokens * 0xd6e8feb86659fd93ULL) ^ lane0);
  return Hash128{lane0, lane1};
}

// ---- SHA-256, written from FIPS 180-4 ----
constexpr std::array<uint32_t, 64> kSha256RoundConstants = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr32(uint32_t x, int r) { return (x >> r) | (x << (32 - r)); }

void sha256_compress(std::array<uint32_t, 8>& state, const uint8_t* chunk) {
  uint32_t w[64];
  for (int t = 0; t < 16; ++t) {
    w[t] = (uint32_t{chunk[4 * t]} << 24) | (uint32_t{chunk[4 * t + 1]} << 16) | (uint32_t{chunk[4 * t + 2]} << 8) |
           uint32_t{chunk[4 * t + 3]};
  }
  for (int t = 16; t < 64; ++t) {
    uint32_t s0 = rotr32(w[t - 15], 7) ^ rotr32(w[t - 15], 18) ^ (w[t - 15] >> 3);
    uint32_t s1 = rotr32(w[t - 2], 17) ^ rotr32(w[t - 2], 19) ^ (w[t - 2] >> 10);
    w[t] = w[t - 16] + s0 + w[t - 7] + s1;
  }
  uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
  uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
  for (int t = 0; t < 64; ++t) {
    uint32_t sum1 = rotr32(e, 6) ^ rotr32(e, 11) ^ rotr32(e, 25);
    uint32_t choose = (e & f) ^ (~e & g);
    uint32_t temp1 = h + sum1 + choose + kSha256RoundConstants[t] + w[t];
    uint32_t sum0 = rotr32(a, 2) ^ rotr32(a, 13) ^ rotr32(a, 22);
    uint32_t majority = (a & b) ^ (a & c) ^ (b & c);
    uint32_t temp2 = sum0 + majority;
    h = g;
    g = f;
    f = e;
    e = d + temp1;
    d = c;
    c = b;
    b = a;
    a = temp1 + temp2;
  }
  state[0] += a; state[1] += b; state[2] += c; state[3] += d;
  state[4] += e; state[5] += f; state[6] += g; state[7] += h;
}

Hash128 sha256_chained(const Hash128& parent, const int32_t* tokens, size_t num_tokens) {
  // Message: parent key (16 bytes, little endian) then each token as 4 little-endian bytes.
  std::vector<uint8_t> message(16 + 4 * num_tokens);
  for (int k = 0; k < 8; ++k) {
    message[k] = static_cast<uint8_t>(parent.lo >> (8 * k));
    message[8 + k] = static_cast<uint8_t>(parent.hi >> (8 * k));
  }
  for (size_t i = 0; i < num_tokens; ++i) {
    uint32_t token = static_cast<uint32_t>(tokens[i]);
    for (int k = 0; k < 4; ++k) message[16 + 4 * i + k] = static_cast<uint8_t>(token >> (8 * k));
  }
  uint8_t digest[32];
  sha256(message.data(), message.size(), digest);
  Hash128 key;
  for (int k = 0; k < 8; ++k) {
    key.lo |= uint64_t{digest[k]} << (8 * k);
    key.hi |= uint64_t{digest[8 + k]} << (8 * k);
  }
  return key;
}

}  // namespace

void sha256(const uint8_t* data, size_t size, uint8_t digest[32]) {
  std::array<uint32_t, 8> state = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  size_t full = size / 64 * 64;
  for (size_t offset = 0; offset < full; offset += 64) sha256_compress(state, data + offset);
  // Padding: 0x80, zeros, then the message length in bits as a big-endian 64-bit integer.
  uint8_t tail[128] = {0};
  size_t rest = size - full;
  if (rest > 0) std::memcpy(tail, data + full, rest);
  tail[rest] = 0x80;
  size_t tail_size = rest + 1 + 8 <= 64 ? 64 : 128;
  uint64_t bits = static_cast<uint64_t>(size) * 8;
  for (int k = 0; k < 8; ++k) tail[tail_size - 1 - k] = static_cast<uint8_t>(bits >> (8 * k));
  for (size_t offset = 0; offset < tail_size; offset += 64) sha256_compress(state, tail + offset);
  for (int i = 0; i < 8; ++i) {
    for (int k = 0; k < 4; ++k) digest[4 * i + k] = static_cast<uint8_t>(state[i] >> (24 - 8 * k));
  }
}

Hash128 hash_block(HashAlgorithm algorithm, const Hash128& parent, const int32_t* tokens, size_t num_tokens) {
  return algorithm == HashAlgorithm::kSha256 ? sha256_chained(parent, tokens, num_tokens)
                                             : fast128(parent, tokens, num_tokens);
}

void hash_full_blocks(HashAlgorithm algorithm, uint64_t salt, const int32_t* tokens, size_t num_tokens,
                      int32_t block_size, Hash128* out) {
  Hash128 parent = chain_root(salt);
  size_t step = static_cast<size_t>(block_size);
  for (size_t b = 0; (b + 1) * step <= num_tokens; ++b) {
    parent = hash_block(algorithm, parent, tokens + b * step, step);
    out[b] = parent;
  }
}

}  // namespace kvsched
