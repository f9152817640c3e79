// The transposed small-row consumer of the Hopper MLA decode (kernel variant 4: an fp8 cache with
// at most 32 query rows; at <= 16 rows the register-widened variant 5 replaced its 16-row form,
// mla_decode_sm90_fp8_regs.cuh, which shares softmax_t); included by mla_decode_sm90_kernel.cuh
// after the helpers it uses (qk_off, pv_off_v / pv_off_p, row_limit, load_q_f16).
//
// With 16 rows (16 heads, q_len 1) a 64-row wgmma tile is three quarters padding, and the
// padded tensor work (~2.7 us per 64-key tile for the two lockstep consumers) is slower than
// the tile's fp8 bytes arrive (~1.6 us per SM). Transposed, the keys are the 64-wide M side and
// the N = 16 or 32 query rows the narrow side, so nothing is padded:
//   S^T [64 keys x N] = K [64 x 576] Q^T            wgmma m64nNk16, A = K (K-major), B = Q (K-major)
//   O^T [512 x N]    += V^T [512 x 64] P^T [64 x N]  8 blocks of m64nNk16, A = V^T: the tile's value
//                                                    panels read MN-major (16-bit types allow it),
//                                                    B = P [N x 64 keys] K-major over the rope panel
// One consumer warpgroup does both products of a tile (O^T is 8 x N / 2 registers per thread);
// two producer warpgroups (run_producer_fp8<2>) fill the two stages, one each, so two tiles of
// codes are in flight per SM.
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
constexpr int kTWarps = 4;                  // the transposed consumer: one warpgroup
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

// S^T = K Q^T over 576 dims: 36 k-steps of 16 (K and Q share the panel layout, so the offsets).
template <MmaType kT, int kN, int... kK>
__device__ __forceinline__ void qk_t_steps(float (&s)[kN / 2], uint64_t dk, uint64_t dq,
                                           std::integer_sequence<int, kK...>) {
  (wgmma_m64nk16_ss<kT, kN, 0, qk_off(kK), qk_off(kK)>(s, dk, dq, kK > 0 ? 1 : 0), ...);
}
// O^T block kB (value dims 64 kB ..) += V^T P^T: 4 k-steps of 16 keys.
template <MmaType kT, int kN, int kB, int... kK>
__device__ __forceinline__ void pv_t_steps(float (&o)[kN / 2], uint64_t dv, uint64_t dp,
                                           std::integer_sequence<int, kK...>) {
  (wgmma_m64nk16_ss<kT, kN, 1, kB * kPanelBytes / 16 + pv_off_v(kK), pv_off_p(kK)>(o, dv, dp, 1), ...);
}
template <MmaType kT, int kN, int... kB>
__device__ __forceinline__ void pv_t_blocks(float (&o)[kDimBlocks][kN / 2], uint64_t dv, uint64_t dp,
                                            std::integer_sequence<int, kB...>) {
  (pv_t_steps<kT, kN, kB>(o[kB], dv, dp, std::make_integer_sequence<int, kBlockN / 16>{}), ...);
}
template <MmaType kT, int kN>
__device__ __forceinline__ void issue_qk_t(float (&s)[kN / 2], uint32_t stage_addr, uint32_t q_addr) {
  const uint64_t dk = desc_k_sw128(stage_addr);
  const uint64_t dq = desc_k_sw128(q_addr);
  wgmma_fence();
  qk_t_steps<kT, kN>(s, dk, dq, std::make_integer_sequence<int, kHeadDim / 16>{});
  wgmma_commit();
}
template <MmaType kT, int kN>
__device__ __forceinline__ void issue_pv_t(float (&o)[kDimBlocks][kN / 2], uint32_t stage_addr) {
  // V^T: M = value dims, 64 per panel (one swizzle atom wide); K = keys, 8-key atoms 1024 B apart.
  const uint64_t dv = desc_mn_sw128(stage_addr, kPanelBytes);
  const uint64_t dp = desc_k_sw128(stage_addr + kRopePanel * kPanelBytes);
  wgmma_fence();
  // Block by block; issuing k-step by k-step across the blocks (consecutive wgmma on different
  // accumulators), or S^T over two accumulators, changed nothing measurable (H100, 2026-11-24).
  pv_t_blocks<kT, kN>(o, dv, dp, std::make_integer_sequence<int, kDimBlocks>{});
  wgmma_commit();
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
                                          int key0, bool masked, const int (&lim)[kN / 4], float* mbuf,
                                          uint8_t* p_panel, int warp, int lane, int quad, float (&m)[kN / 4],
                                          float (&l)[kN / 4], int bar_max = kBarMax, int bar_p = kBarP) {
  constexpr int kC = kN / 4;
  const float ninf = neg_inf();
  const int kr = 16 * warp + (lane >> 2);  // this thread's keys of the tile: kr and kr + 8
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) s[i] *= scale;
  if (masked) {
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int i = 4 * (c >> 1) + (c & 1);
      s[i] = key0 + kr < lim[c] ? s[i] : ninf;
      s[i + 2] = key0 + kr + 8 < lim[c] ? s[i + 2] : ninf;
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

// The end of a segment: the row sums (quad lanes, then the 4 warps through ssum), then the final
// rows (bf16 out, lse) when this CTA had the whole sequence, or a normalised fp32 partial for
// the combine kernel; out_scale multiplies the output (the fp8 cache's kv_scale).
template <int kN>
__device__ __forceinline__ void finish_segment_t(const MlaDecodeSm90Params& p, const SlotRange& sr,
                                                 const Segment& seg, const float (&o)[kDimBlocks][kN / 2],
                                                 const float (&m)[kN / 4], float (&l)[kN / 4], float out_scale,
                                                 float* ssum, int warp, int lane, int quad) {
  constexpr int kC = kN / 4;
  const float ninf = neg_inf();
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
#pragma unroll
    for (int c = 0; c < kC; ++c) l[c] += __shfl_xor_sync(0xffffffffu, l[c], off);
  }
  if (lane < 4) {
#pragma unroll
    for (int c = 0; c < kC; ++c) ssum[warp * kTStride + t_row(c, quad)] = l[c];
  }
  named_bar_sync(kBarEpi, 32 * kTWarps);
  const int d = 16 * warp + (lane >> 2);  // this thread's value dims of each block: d, d + 8
  const bool whole = seg.t0 == 0 && seg.t1 == seg.tiles;
  const int64_t first_row =
      whole ? static_cast<int64_t>(seg.b) * p.rows
            : static_cast<int64_t>(partial_index(sr.slot, seg.start, sr.per_slot)) * p.rows;
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int n = t_row(c, quad);
    if (n >= p.rows) continue;
    const float sum = (ssum[n] + ssum[kTStride + n]) + (ssum[2 * kTStride + n] + ssum[3 * kTStride + n]);
    // A row that saw no key: l = 0 -> out 0, lse -inf.
    const float inv = sum > 0.f ? out_scale / sum : 0.f;
    const float lse = sum > 0.f ? (m[c] + __log2f(sum)) * kLn2 : ninf;
    const int i = 4 * (c >> 1) + (c & 1);
    const int64_t at = (first_row + n) * kHeadDimV + d;
    if (whole) {
      __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + at;
#pragma unroll
      for (int b = 0; b < kDimBlocks; ++b) {
        out[64 * b] = __float2bfloat16_rn(o[b][i] * inv);
        out[64 * b + 8] = __float2bfloat16_rn(o[b][i + 2] * inv);
      }
      if (warp == 0 && lane < 4) p.lse[first_row + n] = lse;
    } else {
      float* out = p.ws_out + at;
#pragma unroll
      for (int b = 0; b < kDimBlocks; ++b) {
        out[64 * b] = o[b][i] * inv;
        out[64 * b + 8] = o[b][i + 2] * inv;
      }
      if (warp == 0 && lane < 4) p.ws_lse[first_row + n] = lse;
    }
  }
}

// A segment's column state (columns = query rows): each column's key limit, no exponent base yet
// (log2 domain, -inf), empty sums (this thread's part) and O^T. Returns mask_from: tiles reaching
// past it may hold keys some row must not see, or keys past the sequence.
template <int kN>
__device__ __forceinline__ int begin_columns(const MlaDecodeSm90Params& p, int len, int quad, int (&lim)[kN / 4],
                                             float (&m)[kN / 4], float (&l)[kN / 4], float (&o)[kDimBlocks][kN / 2]) {
#pragma unroll
  for (int c = 0; c < kN / 4; ++c) {
    lim[c] = row_limit(p, len, t_row(c, quad));
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

// The consumer warpgroup (threads 256 .. 383) over the fp8 cache's f16 tiles with N = 16 or 32
// rows: the same plan walk, stage ring and lockstep order as run_consumer (QK(t + 1) queues
// behind PV(t) on the tensor cores, the softmax of t + 1 waits for both).
template <int kN>
__device__ __forceinline__ void run_consumer_t(const MlaDecodeSm90Params& p, const SlotRange& sr, uint8_t* smem,
                                               uint32_t smem_base) {
  constexpr MmaType kT = MmaType::kF16;
  constexpr int kC = kN / 4;
  const int wtid = threadIdx.x - 256;  // 0 .. 127
  const int warp = wtid >> 5, lane = wtid & 31, quad = lane & 3;
  const uint32_t q_addr = smem_base + kQOff;
  const uint32_t bar_full0 = smem_base + kBarOff;
  const uint32_t bar_empty0 = bar_full0 + kStages * 8;
  float* smax = reinterpret_cast<float*>(smem + kMaxOff);
  float* ssum = reinterpret_cast<float*>(smem + kSumOff);
  const float kv_scale = __ldg(p.kv_scale);

  float o[kDimBlocks][kN / 2];
  float s[kN / 2];
  SegIter it{sr.first_b, sr.first_start};
  Segment seg;
  uint32_t iter = 0;
  while (next_segment(p, sr, it, seg)) {
    named_bar_sync(kBarSeg, 32 * kTWarps);  // the previous segment's ssum reads are done
    // Rows 0 .. 31 of Q (zero past p.rows), f16 after the power-of-two scale.
    const float scale = p.scale_log2 * kv_scale * load_q_f16<kTWarps>(p, seg.b, 0, smem + kQOff, wtid, ssum);
    fence_proxy_async();
    named_bar_sync(kBarSeg, 32 * kTWarps);

    int lim[kC];
    float m[kC], l[kC];
    const int mask_from = begin_columns<kN>(p, seg.len, quad, lim, m, l, o);

    if constexpr (trace::kProbe == trace::kProbeProducers) {  // probe: release each tile once full
      for (int t = seg.t0; t < seg.t1; ++t, ++iter) {
        mbar_wait(bar_full0 + (iter & 1) * 8, (iter >> 1) & 1);
        if (lane == 0) mbar_arrive(bar_empty0 + (iter & 1) * 8);
      }
      finish_segment_t<kN>(p, sr, seg, o, m, l, kv_scale, ssum, warp, lane, quad);
      continue;
    }
    mbar_wait(bar_full0 + (iter & 1) * 8, (iter >> 1) & 1);
    issue_qk_t<kT, kN>(s, smem_base + kStageOff + (iter & 1) * kTileBytes, q_addr);
    for (int t = seg.t0; t < seg.t1; ++t, ++iter) {
      const int stage = iter & 1;
      const uint32_t stage_addr = smem_base + kStageOff + stage * kTileBytes;
      uint8_t* stage_ptr = smem + kStageOff + stage * kTileBytes;
      // In flight: PV(t-1) (if any), then QK(t). Groups retire in order.
      wgmma_wait<1>();
      fence_o<kN>(o);
      if (t > seg.t0 && lane == 0) mbar_arrive(bar_empty0 + (stage ^ 1) * 8);  // tile t-1 consumed
      wgmma_wait<0>();
      fence_regs(s);
      softmax_t<kT, kN>(s, o, scale, t * kBlockN, t * kBlockN + kBlockN > mask_from, lim, smax,
                        stage_ptr + kRopePanel * kPanelBytes, warp, lane, quad, m, l);
      issue_pv_t<kT, kN>(o, stage_addr);
      if (t + 1 < seg.t1) {
        mbar_wait(bar_full0 + ((iter + 1) & 1) * 8, ((iter + 1) >> 1) & 1);
        issue_qk_t<kT, kN>(s, smem_base + kStageOff + ((iter + 1) & 1) * kTileBytes, q_addr);
      }
    }
    wgmma_wait<0>();
    fence_o<kN>(o);
    if (lane == 0) mbar_arrive(bar_empty0 + ((iter - 1) & 1) * 8);

    finish_segment_t<kN>(p, sr, seg, o, m, l, kv_scale, ssum, warp, lane, quad);
  }
}

}  // namespace tokenspeed::mla_sm90::dev
