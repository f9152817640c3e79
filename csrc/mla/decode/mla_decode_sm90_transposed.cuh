// The column softmax of the Hopper MLA decode's transposed small-row consumers (kernel variants 5
// and 6: an fp8 cache with at most 16 / 32 query rows, mla_decode_sm90_fp8_regs.cuh); included by
// mla_decode_sm90_kernel.cuh after the helpers it uses (row_limit).
//
// With 16 rows (16 heads, q_len 1) a 64-row wgmma tile is three quarters padding, and the padded
// tensor work is slower than the tile's fp8 bytes arrive. Transposed, the keys are the 64-wide M
// side and the N = 16 or 32 query rows the narrow side, so nothing is padded:
//   S^T [64 keys x N] = K [64 x 576] Q^T            wgmma m64nNk16, B = Q (K-major)
//   O^T [512 x N]    += V^T [512 x 64] P^T [64 x N]  8 blocks of m64nNk16, B = P [N x 64 keys] K-major
// (The first transposed consumer, variant 4, read both A operands from f16 tiles that producer
// warpgroups widened; variants 5 / 6 build them in registers from the e4m3 stages and replaced it:
// at 17-32 rows 1.3-1.6x faster, H100 2026-11-24.)
//
// Accumulator fragment (m64nNk16, f32): thread (warp, lane) holds rows 16 warp + lane / 4 and
// + 8 (keys of S^T, value dims of an O^T block) and, per group j of 8 columns, columns
// 8 j + 2 quad + e (query rows): d[4 j + e] (first row), d[4 j + 2 + e] (second row). Its
// kN / 4 columns are indexed c = 2 j + e below. The softmax runs down the columns: a row's
// maximum over the tile is a reduction over the 8 lanes of a quad column and the 4 warps
// (through smem); its sum stays a per-thread part until the segment ends.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "common/sm90_ptx.cuh"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_layout.cuh"
#include "mla/decode/mla_decode_sm90_schedule.cuh"
#include "mla/decode/mla_decode_sm90_trace.cuh"
#include "mla/decode/mla_decode_sm90_wgmma.cuh"

namespace tokenspeed::mla_sm90::dev {

constexpr int kDimBlocks = kHeadDimV / 64;  // O^T blocks of 64 value dims
constexpr int kTWarps = 4;                  // warps of one transposed consumer warpgroup
constexpr int kTStride = 32;                // floats per warp in the max / sum exchange buffers

// The query row of this thread's column c.
__device__ __forceinline__ int t_row(int c, int quad) { return 8 * (c >> 1) + 2 * quad + (c & 1); }

template <MmaType kT>
__device__ __forceinline__ uint16_t half_bits(float x) {
  if constexpr (kT == MmaType::kF16) {
    return __half_as_ushort(__float2half_rn(x));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
}

template <int kN>
__device__ __forceinline__ void fence_o(float (&o)[kDimBlocks][kN / 2]) {
#pragma unroll
  for (int b = 0; b < kDimBlocks; ++b) fence_regs(o[b]);
}

// One tile of the online softmax down the columns of S^T: scale to the log2 domain, mask, the
// column maxima (quad lanes, then the 4 warps through mbuf), the conditional rescale of O^T and
// the sums, P = exp2(S - base) written as P [rows][64 keys] over the rope panel, and the barrier
// after which the whole P is in smem. bar_max / bar_p: the warpgroup's own named barriers.
template <MmaType kT, int kN>
__device__ __forceinline__ void softmax_t(float (&s)[kN / 2], float (&o)[kDimBlocks][kN / 2], float scale,
                                          int key0, bool masked, const MlaDecodeSm90Params& p, int len, float* mbuf,
                                          uint8_t* p_panel, int warp, int lane, int quad, float (&m)[kN / 4],
                                          float (&l)[kN / 4], int bar_max = kBarMax, int bar_p = kBarP) {
  constexpr int kC = kN / 4;
  const float ninf = neg_inf();
  const int kr = 16 * warp + (lane >> 2);  // this thread's keys of the tile: kr and kr + 8
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) s[i] *= scale;
  if (masked) {  // the keys row n may see end at row_limit (computed here: masked tiles are rare)
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int lim = row_limit(p, len, t_row(c, quad));
      const int i = 4 * (c >> 1) + (c & 1);
      s[i] = key0 + kr < lim ? s[i] : ninf;
      s[i + 2] = key0 + kr + 8 < lim ? s[i + 2] : ninf;
    }
  }
  float mx[kC];
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int i = 4 * (c >> 1) + (c & 1);
    mx[c] = fmaxf(s[i], s[i + 2]);
  }
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
#pragma unroll
    for (int c = 0; c < kC; ++c) mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], off));
  }
  if (lane < 4) {
#pragma unroll
    for (int c = 0; c < kC; ++c) mbuf[warp * kTStride + t_row(c, quad)] = mx[c];
  }
  // One buffer is enough: every read of this tile's maxima precedes the kBarP barrier below,
  // every write of the next tile's follows it.
  named_bar_sync(bar_max, 32 * kTWarps);
  float alpha[kC];
  bool moved = false;
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int n = t_row(c, quad);
    const float tile_max = fmaxf(fmaxf(mbuf[n], mbuf[kTStride + n]), fmaxf(mbuf[2 * kTStride + n], mbuf[3 * kTStride + n]));
    alpha[c] = 1.f;
    if (tile_max > m[c] + kRescaleThreshold) {  // false while tile_max = -inf
      alpha[c] = exp2_approx(m[c] - tile_max);  // m = -inf -> 0 (O and l are still 0)
      m[c] = tile_max;
      moved = true;
    }
    const float base = m[c] == ninf ? 0.f : m[c];  // a row with no key yet: exp2(-inf - 0) = 0
    const int i = 4 * (c >> 1) + (c & 1);
    s[i] = exp2_approx(s[i] - base);
    s[i + 2] = exp2_approx(s[i + 2] - base);
    l[c] = l[c] * alpha[c] + (s[i] + s[i + 2]);
    // P [row n][key]: 128-byte rows, key k in 16-byte chunk k / 8 XOR (n % 8); keys kr, kr + 8
    // are chunks 2 warp and 2 warp + 1, element lane / 4.
    uint8_t* row = p_panel + n * 128 + (lane >> 2) * 2;
    *reinterpret_cast<uint16_t*>(row + (((2 * warp) ^ (n & 7)) << 4)) = half_bits<kT>(s[i]);
    *reinterpret_cast<uint16_t*>(row + (((2 * warp + 1) ^ (n & 7)) << 4)) = half_bits<kT>(s[i + 2]);
  }
  // Every warp sees the same maxima, so a moved base is the same decision in all of them.
  if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
    for (int b = 0; b < kDimBlocks; ++b) {
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const int i = 4 * (c >> 1) + (c & 1);
        o[b][i] *= alpha[c];
        o[b][i + 2] *= alpha[c];
      }
    }
  }
  fence_proxy_async();  // P stores -> read by wgmma
  named_bar_sync(bar_p, 32 * kTWarps);
}

// A segment's column state (columns = query rows): no exponent base yet (log2 domain, -inf), empty
// sums (this thread's part) and O^T. Returns mask_from: tiles reaching past it may hold keys some
// row must not see, or keys past the sequence.
template <int kN>
__device__ __forceinline__ int begin_columns(const MlaDecodeSm90Params& p, int len, float (&m)[kN / 4],
                                             float (&l)[kN / 4], float (&o)[kDimBlocks][kN / 2]) {
#pragma unroll
  for (int c = 0; c < kN / 4; ++c) {
    m[c] = neg_inf();
    l[c] = 0.f;
  }
#pragma unroll
  for (int b = 0; b < kDimBlocks; ++b) {
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) o[b][i] = 0.f;
  }
  return len - (p.causal ? p.q_len - 1 : 0);
}

}  // namespace tokenspeed::mla_sm90::dev
