// 64-bit hash of one KV page in a prefix chain: hash(parent page's hash, page token ids).
// A hit is never trusted on the hash alone: the prefix cache also compares the token ids
// and the parent page, so a collision can only cost a miss, never a wrong page.
#pragma once

#include <bit>
#include <cstdint>

namespace tokenspeed::sched {

// Hash of the empty prefix: the parent of a request's first page.
inline constexpr uint64_t kRootPageHash = 0x243f6a8885a308d3ULL;

// splitmix64 finaliser: full avalanche of a 64-bit word.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

inline uint64_t hash_page(uint64_t parent_hash, const int32_t* tokens, int32_t n) {
  uint64_t h = mix64(parent_hash ^ 0x9e3779b97f4a7c15ULL);
  for (int32_t i = 0; i < n; ++i) {
    h = (std::rotl(h, 23) ^ static_cast<uint32_t>(tokens[i])) * 0x9e3779b97f4a7c15ULL;
  }
  return mix64(h ^ static_cast<uint64_t>(n));
}

}  // namespace tokenspeed::sched
