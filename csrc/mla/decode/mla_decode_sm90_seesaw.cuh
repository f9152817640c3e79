// The seesaw schedule of the Hopper MLA decode (p.schedule == 1); included by
// mla_decode_sm90_kernel.cuh after the helpers it shares with the lockstep schedule.
//
// Tiles go in pairs (a, b) within a segment. WG0 computes S_a = Q K_a^T (all 64 keys,
// m64n64k16), WG1 S_b; WG0 holds O_L (value dims 0..255), WG1 O_R (256..511). The row
// base m is handed over through smem: WG0 forms P_a with base m_a, WG1 forms P_b with
// m_b >= m_a. Each writes its P (bf16) over the rope panel of its tile (dead after its
// QK^T), read from there by both warpgroups' PV (A from smem: P in registers as well
// would need 16 more registers per thread than the 240 a consumer has):
//   WG0: O_L += P_a V_aL, then O_L += P_b V_bL
//   WG1: O_R += P_a V_aR, then O_R += P_b V_bR
// so WG0's softmax runs under WG1's QK^T and WG1's softmax under WG0's PV.
//
// A stage is loaded and released in halves: L = value panels 0-3 (read by WG0's PVs,
// released by WG0), R = panels 4-7 and the rope panel (released by WG1). The producer
// waits for L's release, loads it, then waits for R's release (so both halves are free
// before the rope panel, which held a P read by either warpgroup, is overwritten) and
// loads R. QK^T of a tile starts on the L half while R is landing.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "common/sm90_ptx.cuh"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_layout.cuh"
#include "mla/decode/mla_decode_sm90_schedule.cuh"
#include "mla/decode/mla_decode_sm90_softmax.cuh"
#include "mla/decode/mla_decode_sm90_trace.cuh"
#include "mla/decode/mla_decode_sm90_wgmma.cuh"

namespace tokenspeed::mla_sm90::dev {

// kind 0: full (producer's expect_tx), 1: empty (4 warps of the releasing warpgroup).
__device__ __forceinline__ uint32_t half_bar(uint32_t smem_base, int kind, int half, int stage) {
  return smem_base + kHalfBarOff + ((kind * 2 + half) * kStages + stage) * 8;
}

__device__ __forceinline__ void run_producer_halves(const CUtensorMap* kv_map, const MlaDecodeSm90Params& p,
                                                    const SlotRange& sr, uint32_t smem_base) {
  const int ps_log2 = p.page_size_log2;
  const int box_log2 = ps_log2 < 6 ? ps_log2 : 6;
  const uint32_t box_bytes = (1u << box_log2) * 128u;
  SegIter it{sr.first_b, sr.first_start};
  Segment seg;
  uint32_t iter = 0;
  while (next_segment(p, sr, it, seg)) {
    const int32_t* table = p.block_table + static_cast<int64_t>(seg.b) * p.block_table_stride;
    for (int t = seg.t0; t < seg.t1; ++t, ++iter) {
      const int stage = iter & 1;
      const TileBoxes tb = tile_boxes(table, t * kBlockN, seg.len, ps_log2, box_log2);
      const int boxes = tb.boxes;
      const uint32_t dst = smem_base + kStageOff + stage * kTileBytes;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        mbar_wait(half_bar(smem_base, 1, half, stage), ((iter >> 1) & 1) ^ 1);
        const int panels = half == 0 ? 4 : 5;  // R: value panels 4-7 and the rope panel 8
        const uint32_t full = half_bar(smem_base, 0, half, stage);
        mbar_arrive_expect_tx(full, static_cast<uint32_t>(boxes * panels) * box_bytes);
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          if (x < boxes) {
#pragma unroll
            for (int c = 0; c < 5; ++c) {
              if (c < panels) {
                const int panel = 4 * half + c;
                tma_load_2d(dst + panel * kPanelBytes + x * box_bytes, kv_map, panel * 64, tb.cache_row[x], full);
              }
            }
          }
        }
      }
    }
  }
}

// ---- the pieces of one warpgroup's turn ----

// S = Q K^T of all 64 keys over 576 dims (36 k-steps; the first 16 read the L half).
template <int kFirst, int... kK>
__device__ __forceinline__ void qk_tile_steps(float (&s)[32], uint64_t dq, uint64_t dk,
                                              std::integer_sequence<int, kK...>) {
  (wgmma_m64n64k16_ss<MmaType::kBF16, qk_off(kFirst + kK), qk_off(kFirst + kK)>(s, dq, dk, kFirst + kK > 0 ? 1 : 0), ...);
}
__device__ __forceinline__ void seesaw_qk(float (&s)[32], uint32_t q_addr, uint32_t stage_addr, uint32_t smem_base,
                                          int stage, uint32_t phase) {
  const uint64_t dq = desc_k_sw128(q_addr);
  const uint64_t dk = desc_k_sw128(stage_addr);
  // Two commit groups, each behind its own wait and fence: a barrier wait between the wgmma
  // of one group is a divergent path in which ptxas inserts its own fence and serializes
  // every wgmma of the kernel (C7520).
  mbar_wait(half_bar(smem_base, 0, 0, stage), phase);
  wgmma_fence();
  qk_tile_steps<0>(s, dq, dk, std::make_integer_sequence<int, 16>{});
  wgmma_commit();
  mbar_wait(half_bar(smem_base, 0, 1, stage), phase);
  wgmma_fence();
  qk_tile_steps<16>(s, dq, dk, std::make_integer_sequence<int, kHeadDim / 16 - 16>{});
  wgmma_commit();
}

// Scores to the log2 domain, keys a row may not see to -inf, the two rows' maxima.
__device__ __forceinline__ void scores_max(float (&s)[32], float scale_log2, int key0, bool mask, int lim0,
                                           int lim1, int quad, float& mx0, float& mx1) {
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] *= scale_log2;
  if (mask) mask_keys<8>(s, key0, lim0, lim1, quad);
  row_max<8>(s, mx0, mx1);
}

// The conditional rescale's new base: moves only when the max passes it by kRescaleThreshold.
__device__ __forceinline__ float moved_base(float m, float mx) { return mx > m + kRescaleThreshold ? mx : m; }

// O and l from base m to base n (rows where n == m keep their values; m = -inf -> factor 0,
// O and l are still 0 then). The 128-register multiply runs only in warps where a row moved.
// No wgmma may be accumulating into O: a wgmma wait inside this data-dependent branch makes
// ptxas serialize every wgmma of the kernel (C7518), so callers wait before, unconditionally.
__device__ __forceinline__ void rebase(float (&o)[128], float& m0, float& m1, float& l0, float& l1, float n0,
                                       float n1) {
  if (__any_sync(0xffffffffu, n0 != m0 || n1 != m1)) {
    const float c0 = n0 == m0 ? 1.f : exp2_approx(m0 - n0), c1 = n1 == m1 ? 1.f : exp2_approx(m1 - n1);
    scale_acc_rows(o, c0, c1);
    l0 *= c0;
    l1 *= c1;
  }
  m0 = n0;
  m1 = n1;
}

// P = exp2(S - base) (base 0 for a row with no key yet), this thread's row sums, and P
// (bf16) over the tile's rope panel (the wgmma A operand of both warpgroups' PV).
__device__ __forceinline__ void form_p(float (&s)[32], float m0, float m1, uint8_t* rope_panel, int row0, int quad,
                                       float& sum0, float& sum1) {
  const float ninf = neg_inf();
  exp2_rows<8>(s, m0 == ninf ? 0.f : m0, m1 == ninf ? 0.f : m1, sum0, sum1);
  store_p<8>(s, rope_panel, row0, quad, 0);
  fence_proxy_async();  // P stores -> read by wgmma (both warpgroups)
}

// Value rows of keys >= valid in this warpgroup's four value panels to 0 (they hold another
// page's tail, stale data or NaN; P = 0 there would still give 0 * NaN), before its PV.
__device__ __forceinline__ void zero_value_tail(uint8_t* tile, int valid, int w, int wtid) {
  if (valid >= kBlockN) return;
  const int n = (kBlockN - valid) * 32;
  for (int idx = wtid; idx < n; idx += 128) {
    const int row = valid + (idx >> 5);
    const int panel = 4 * w + ((idx >> 3) & 3);
    *reinterpret_cast<uint4*>(tile + panel * kPanelBytes + row * 128 + ((idx & 7) << 4)) = make_uint4(0u, 0u, 0u, 0u);
  }
  fence_proxy_async();
  named_bar_sync(kBarWg + w, 128);
}

// One segment's main loop of the seesaw; o, m, l of this warpgroup come back for the epilogue.
__device__ __forceinline__ void seesaw_segment(const MlaDecodeSm90Params& p, const Segment& seg, uint8_t* smem,
                                               uint32_t smem_base, int mb, uint32_t& iter, float (&o)[128],
                                               float& m0, float& m1, float& l0, float& l1,
                                               [[maybe_unused]] trace::PhaseClock& ph_) {
  const int ctid = threadIdx.x - 128;
  const int w = ctid >> 7, wtid = ctid & 127, lane = ctid & 31, quad = lane & 3;
  const int row0 = ((wtid >> 5) << 4) + (lane >> 2), row1 = row0 + 8;
  const uint32_t q_addr = smem_base + kQOff;
  float* sm = reinterpret_cast<float*>(smem + kMaxOff);  // [0][64]: m_a, [1][64]: m_b
  const int lim0 = row_limit(p, seg.len, mb * kBlockM + row0);
  const int lim1 = row_limit(p, seg.len, mb * kBlockM + row1);
  const int mask_from = seg.len - (p.causal ? p.q_len - 1 : 0);
  float s[32];
  // One pair at tiles t, t + 1 (kHasB) or a lone a at t. has_b is a template parameter, not a
  // run-time branch: wgmma waits under a data-dependent branch make ptxas serialize every wgmma
  // of the kernel (C7518), so full pairs and the lone a of an odd segment are separate code.
  auto pair = [&]<bool kHasB>(int t) {
    constexpr bool has_b = kHasB;
    const int sa = iter & 1, sb = sa ^ 1;
    const uint32_t ph_a = (iter >> 1) & 1, ph_b = ((iter + 1) >> 1) & 1;
    const uint32_t addr_a = smem_base + kStageOff + sa * kTileBytes, addr_b = smem_base + kStageOff + sb * kTileBytes;
    uint8_t* tile_a = smem + kStageOff + sa * kTileBytes;
    uint8_t* tile_b = smem + kStageOff + sb * kTileBytes;
    const int key_a = t * kBlockN, key_b = key_a + kBlockN;
    float sum0, sum1;
    TS_MLA_PHASE_TILE();
    if (w == 0) {
      TS_MLA_PHASE(7);
      seesaw_qk(s, q_addr, addr_a, smem_base, sa, ph_a);
      TS_MLA_PHASE(0);
      wgmma_wait<0>();  // also retires last pair's PVs
      fence_regs(s);
      fence_regs(o);
      TS_MLA_PHASE(1);
      float mx0, mx1;
      scores_max(s, p.scale_log2, key_a, key_a + kBlockN > mask_from, lim0, lim1, quad, mx0, mx1);
      const float n0 = moved_base(m0, mx0), n1 = moved_base(m1, mx1);
      form_p(s, n0, n1, tile_a + kRopePanel * kPanelBytes, row0, quad, sum0, sum1);
      if (quad == 0) {
        sm[row0] = n0;
        sm[row1] = n1;
      }
      named_bar_arrive(kBarA, 256);
      TS_MLA_PHASE(2);
      rebase(o, m0, m1, l0, l1, n0, n1);
      l0 += sum0;
      l1 += sum1;
      zero_value_tail(tile_a, seg.len - key_a, 0, wtid);
      named_bar_sync(kBarWg, 128);  // all of P_a in smem before this warpgroup's wgmma reads it
      issue_pv(o, addr_a, 0);
      TS_MLA_PHASE(3);
      // Release a's L half as soon as PV_aL retires (WG1 is forming P_b meanwhile), so the
      // producer starts the next pair's first tile early.
      wgmma_wait<0>();
      fence_regs(o);
      TS_MLA_PHASE(4);
      if (lane == 0) mbar_arrive(half_bar(smem_base, 1, 0, sa));
      if constexpr (has_b) {
        named_bar_sync(kBarB, 256);
        TS_MLA_PHASE(5);
        rebase(o, m0, m1, l0, l1, sm[kBlockM + row0], sm[kBlockM + row1]);  // O_L to b's base (rare)
        mbar_wait(half_bar(smem_base, 0, 0, sb), ph_b);  // b's L half: landed (WG1 saw it), visible here
        zero_value_tail(tile_b, seg.len - key_b, 0, wtid);
        issue_pv(o, addr_b, 0);
        TS_MLA_PHASE(6);
        wgmma_wait<0>();
        fence_regs(o);
        if (lane == 0) mbar_arrive(half_bar(smem_base, 1, 0, sb));
      }
    } else {
      float mx0 = neg_inf(), mx1 = neg_inf();
      TS_MLA_PHASE(7);
      if constexpr (has_b) {
        seesaw_qk(s, q_addr, addr_b, smem_base, sb, ph_b);
        TS_MLA_PHASE(0);
        wgmma_wait<0>();  // also retires last pair's PVs
        fence_regs(s);
        TS_MLA_PHASE(1);
        scores_max(s, p.scale_log2, key_b, key_b + kBlockN > mask_from, lim0, lim1, quad, mx0, mx1);
      } else {
        wgmma_wait<0>();
      }
      fence_regs(o);
      named_bar_sync(kBarA, 256);
      TS_MLA_PHASE(2);
      const float ma0 = sm[row0], ma1 = sm[row1];
      float nb0 = ma0, nb1 = ma1;
      if constexpr (has_b) {
        nb0 = moved_base(ma0, mx0);
        nb1 = moved_base(ma1, mx1);
        form_p(s, nb0, nb1, tile_b + kRopePanel * kPanelBytes, row0, quad, sum0, sum1);
        if (quad == 0) {
          sm[kBlockM + row0] = nb0;
          sm[kBlockM + row1] = nb1;
        }
        named_bar_arrive(kBarB, 256);
      }
      TS_MLA_PHASE(3);
      rebase(o, m0, m1, l0, l1, ma0, ma1);  // O_R and l to a's base for PV_aR (P_a has it)
      mbar_wait(half_bar(smem_base, 0, 1, sa), ph_a);  // a's R half: landed (WG0 saw it), visible here
      zero_value_tail(tile_a, seg.len - key_a, 1, wtid);
      issue_pv(o, addr_a, 1);
      TS_MLA_PHASE(4);
      // PV_aR retires before O_R may move to b's base (a wait under the rare branch would be
      // C7514), and a's R half is released right then.
      wgmma_wait<0>();
      fence_regs(o);
      TS_MLA_PHASE(5);
      if (lane == 0) mbar_arrive(half_bar(smem_base, 1, 1, sa));
      if constexpr (has_b) {
        rebase(o, m0, m1, l0, l1, nb0, nb1);
        l0 += sum0;
        l1 += sum1;
        zero_value_tail(tile_b, seg.len - key_b, 1, wtid);
        named_bar_sync(kBarWg + 1, 128);  // all of P_b in smem before this warpgroup's wgmma reads it
        issue_pv(o, addr_b, 1);
        TS_MLA_PHASE(6);
        wgmma_wait<0>();
        fence_regs(o);
        if (lane == 0) mbar_arrive(half_bar(smem_base, 1, 1, sb));
      }
    }
    iter += has_b ? 2 : 1;  // the producer counts tiles: a lone a uses one stage
  };
  int t = seg.t0;
  for (; t + 1 < seg.t1; t += 2) pair.template operator()<true>(t);
  if (t < seg.t1) pair.template operator()<false>(t);
}

}  // namespace tokenspeed::mla_sm90::dev
