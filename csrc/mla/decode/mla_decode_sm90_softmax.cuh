// The per-thread softmax pieces both consumer schedules of the Hopper MLA decode share. A
// thread holds, of a wgmma accumulator with kGroups groups of 8 key columns, rows row0 and
// row0 + 8: s[4j + e] = (row0, key 8j + 2q + e), s[4j + 2 + e] = (row0 + 8, same key), q = lane % 4.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/sm90_ptx.cuh"
#include "mla/decode/mla_decode_sm90_wgmma.cuh"

namespace tokenspeed::mla_sm90::dev {

using namespace ::tokenspeed::sm90;

// Keys a row may not see (>= lim) to -inf: a select, before any max or exp. key_first is the
// key of the thread's column 0 (8j + 2q + e are added).
template <int kGroups>
__device__ __forceinline__ void mask_keys(float (&s)[4 * kGroups], int key_first, int lim0, int lim1, int quad) {
  const float ninf = neg_inf();
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = key_first + 8 * j + 2 * quad + e;
      s[4 * j + e] = key < lim0 ? s[4 * j + e] : ninf;
      s[4 * j + 2 + e] = key < lim1 ? s[4 * j + 2 + e] : ninf;
    }
  }
}

// The two rows' maxima over this thread's keys, then over the quad (the whole accumulator row).
template <int kGroups>
__device__ __forceinline__ void row_max(const float (&s)[4 * kGroups], float& mx0, float& mx1) {
  mx0 = neg_inf();
  mx1 = neg_inf();
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
    mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
}

// P = exp2(S - base) in place and this thread's part of the two row sums.
template <int kGroups>
__device__ __forceinline__ void exp2_rows(float (&s)[4 * kGroups], float base0, float base1, float& sum0, float& sum1) {
  sum0 = 0.f;
  sum1 = 0.f;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[4 * j + e] = exp2_approx(s[4 * j + e] - base0);
      s[4 * j + 2 + e] = exp2_approx(s[4 * j + 2 + e] - base1);
      sum0 += s[4 * j + e];
      sum1 += s[4 * j + 2 + e];
    }
  }
}

// Two probabilities as one register of the PV operand type (lo in bits 0..15).
template <MmaType kT>
__device__ __forceinline__ uint32_t pack_p(float lo, float hi) {
  if constexpr (kT == MmaType::kF16) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    return pack_bf16x2(lo, hi);
  }
}

// P (bf16 or f16) into a 128-byte-swizzled K-major [64 rows x 64 keys] panel: row r at r * 128,
// key k in 16-byte chunk k / 8 XOR (r % 8); this thread's groups are chunks chunk0 .. chunk0 + kGroups - 1.
template <int kGroups, MmaType kT = MmaType::kBF16>
__device__ __forceinline__ void store_p(const float (&s)[4 * kGroups], uint8_t* panel, int row0, int quad, int chunk0) {
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const int off0 = row0 * 128 + (((chunk0 + j) ^ (row0 & 7)) << 4) + quad * 4;
    const int off1 = off0 + 8 * 128;  // row0 + 8: same swizzle phase
    *reinterpret_cast<uint32_t*>(panel + off0) = pack_p<kT>(s[4 * j], s[4 * j + 1]);
    *reinterpret_cast<uint32_t*>(panel + off1) = pack_p<kT>(s[4 * j + 2], s[4 * j + 3]);
  }
}

}  // namespace tokenspeed::mla_sm90::dev
