// The Hopper (sm_90a) MLA decode kernel: warp-specialised TMA + wgmma, split-KV
// planned on the device. Included by exactly one translation unit
// (mla_decode_sm90_bf16.cu); the design and its reasoning are in csrc/mla/README.md.
// The kernel is a template on the consumer schedule: 0 (lockstep, described here, opt-in)
// or 1 (seesaw, the default: mla_decode_sm90_seesaw.cuh).
//
// CTA = 3 warpgroups (384 threads), one CTA per SM (~219 KB of shared memory):
//   WG0  producer: one thread walks the CTA's plan range and issues TMA loads of
//        64-key tiles (9 panels of 64 dims x 64 keys, 128-byte swizzled) through the
//        block table into a 2-stage ring guarded by full/empty mbarriers.
//   WG1, WG2  consumers ("w" = 0, 1), both over the same 64 query rows:
//        S_w = Q K_w^T for their 32 keys of the tile (wgmma m64n32k16, A = Q from
//        smem, B = K from smem), exp2-domain online softmax with the row max
//        exchanged between the two warpgroups through smem, P (bf16, 64 x 64) written
//        over the tile's rope panel (dead once both QK^T are done), then
//        O_w += P V_w with V_w = value dims [256w, 256w + 256) of the same smem tile
//        (wgmma m64n256k16, A = P from smem, B = V, MN-major). Each KV byte is read
//        from HBM once and feeds both products.
//
// Shared memory (offsets from a 1024-byte aligned base):
//   [0, 72K)        Q: 9 panels [64 rows][64 dims] bf16, 128B swizzle
//   [72K, 216K)     2 KV stages, same panel layout over [64 keys][576 dims];
//                   panel 8 (rope dims 512..575) is reused for P once QK^T is done
//   then            row-max exchange [2 parities][2 WGs][64], row-sum exchange [2][64],
//                   mbarriers full[2], empty[2], plan scratch
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

namespace tokenspeed::mla_sm90 {

namespace dev {

using namespace ::tokenspeed::sm90;

// ---------------------------------------------------------------------------------
// Producer: one thread issues every TMA load of the CTA, into kStagesN stages of 9 panels
// (kPanelBytesN each, rows of kRowBytes: 128 for 64 bf16 dims, 64 for 64 e4m3 codes) at
// stage_off, guarded by mbarriers full[kStagesN], empty[kStagesN] at bar_off.
// ---------------------------------------------------------------------------------
template <int kStagesN, int kPanelBytesN, int kRowBytes>
__device__ __forceinline__ void run_producer(const CUtensorMap* kv_map, const MlaDecodeSm90Params& p,
                                             const SlotRange& sr, uint32_t smem_base, uint32_t bar_off,
                                             uint32_t stage_off) {
  const int ps_log2 = p.page_size_log2;
  const int box_log2 = ps_log2 < 6 ? ps_log2 : 6;  // a box never crosses a page
  const uint32_t box_bytes = (1u << box_log2) * kRowBytes;
  const uint32_t bar_full0 = smem_base + bar_off;
  const uint32_t bar_empty0 = bar_full0 + kStagesN * 8;
  // The tile walk is the fp8 producers' TileCursor; the next tile's boxes are located (its
  // block-table reads issued) before this tile's stage is waited for. Measured neutral (variant 5's
  // TMA path alone at 128 x 16 x 4K: 113.0 vs 112.3 us located in turn; H100, 2026-11-24).
  auto locate = [&](const TileCursor& c) {
    const int32_t* table = p.block_table + static_cast<int64_t>(c.seg.b) * p.block_table_stride;
    return tile_boxes(table, c.t * kBlockN, c.seg.len, ps_log2, box_log2);
  };
  TileCursor cur;
  cur.start(p, sr);
  TileBoxes next{};
  if (cur.live) next = locate(cur);
  TS_MLA_PHASE_DECL;
  for (uint32_t iter = 0; cur.live; ++iter) {
    const uint32_t stage = iter % kStagesN;
    const TileBoxes tb = next;
    cur.advance(p, sr);
    if (cur.live) next = locate(cur);
    const int boxes = tb.boxes;
    TS_MLA_PHASE(1);
    TS_MLA_PHASE_TILE();
    mbar_wait(bar_empty0 + stage * 8, ((iter / kStagesN) & 1) ^ 1);
    TS_MLA_PHASE(0);
    const uint32_t full = bar_full0 + stage * 8;
    if constexpr (trace::kProbe == trace::kProbeConsumer) {  // probe builds: stages filled with nothing
      mbar_arrive(full);
      continue;
    }
    mbar_arrive_expect_tx(full, static_cast<uint32_t>(boxes) * kPanels * box_bytes);
    const uint32_t dst = smem_base + stage_off + stage * (kPanels * kPanelBytesN);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      if (x < boxes) {
#pragma unroll
        for (int c = 0; c < kPanels; ++c) {
          tma_load_2d(dst + c * kPanelBytesN + x * box_bytes, kv_map, c * 64, tb.cache_row[x], full);
        }
      }
    }
    if (iter == 0) TS_MLA_TRACE_EVENT("decode", trace::kFirstTmaIssued);
  }
  TS_MLA_TRACE_EVENT("decode", trace::kLastTmaIssued);
  TS_MLA_PHASE(1);
  TS_MLA_PHASE_PRINT();
}

// ---------------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------------

// Q rows of (sequence b, row block mb), swizzled into the Q panels like TMA would; rows past
// q_len * heads are zero. Thread (row = ctid / 4, part = ctid % 4) of the 256 consumer threads
// moves 16-byte vectors part + 4k (k = 0..17) of its row, so panel = k / 2 and chunk =
// part + 4 * (k % 2) (offsets are constants). load_q_vectors reads them (bf16), store_q_vectors
// writes them (bf16, or f16 after the fp8 variant's scaling).
constexpr int kQVecs = kHeadDim / 8 / 4;  // 18 vectors of 16 B per thread
__device__ __forceinline__ void load_q_vectors(const MlaDecodeSm90Params& p, int b, int mb, int ctid,
                                               uint4 (&v)[kQVecs]) {
  const int row = ctid >> 2, part = ctid & 3;
  const int r = mb * kBlockM + row;
  const bool real = r < p.rows;
  const uint4* src = nullptr;
  if (real) {
    const int i = r / p.heads, h = r - i * p.heads;
    src = reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.q) + b * p.q_stride_b +
                                         i * p.q_stride_i + h * p.q_stride_h) + part;
  }
#pragma unroll
  for (int k = 0; k < kQVecs; ++k) v[k] = real ? __ldg(src + 4 * k) : make_uint4(0u, 0u, 0u, 0u);
}
__device__ __forceinline__ void store_q_vectors(uint8_t* q_smem, int ctid, const uint4 (&v)[kQVecs]) {
  const int row = ctid >> 2, part = ctid & 3;
  uint8_t* dst_even = q_smem + row * 128 + ((part ^ (row & 7)) << 4);
  uint8_t* dst_odd = q_smem + row * 128 + (((part + 4) ^ (row & 7)) << 4);
#pragma unroll
  for (int k = 0; k < kQVecs; ++k) {
    *reinterpret_cast<uint4*>(((k & 1) ? dst_odd : dst_even) + (k >> 1) * kPanelBytes) = v[k];
  }
}
__device__ __forceinline__ void load_q(const MlaDecodeSm90Params& p, int b, int mb, uint8_t* q_smem, int ctid) {
  uint4 v[kQVecs];
  load_q_vectors(p, b, mb, ctid, v);
  store_q_vectors(q_smem, ctid, v);
}

// Keys a row may see: [0, limit). Rows past q_len * heads (padding of the last row
// block) see the whole sequence; their results are discarded.
__device__ __forceinline__ int row_limit(const MlaDecodeSm90Params& p, int len, int r) {
  if (!p.causal || r >= p.rows) return len;
  const int i = r / p.heads;
  return min(len, len - p.q_len + 1 + i);
}

// Waits for a tile and, when it is the sequence's last partial tile, zeroes the value
// rows of keys >= len in this warpgroup's four value panels: those rows hold another
// page's tail, stale data or NaN, and P = 0 there would still give 0 * NaN = NaN.
// kZeroTail = false: the fp8 variant's producer already wrote those rows as zeros.
template <bool kZeroTail = true>
__device__ __forceinline__ void acquire_tile(uint8_t* smem, uint32_t smem_base, uint32_t iter, int valid,
                                             int w, int wtid) {
  const int stage = iter & 1;
  mbar_wait(smem_base + kBarOff + stage * 8, (iter >> 1) & 1);
  if (kZeroTail && valid < kBlockN) {
    uint8_t* tile = smem + kStageOff + stage * kTileBytes;
    const int n = (kBlockN - valid) * 32;  // rows x 4 panels x 8 vectors of 16 B
    for (int idx = wtid; idx < n; idx += 128) {
      const int row = valid + (idx >> 5);
      const int panel = 4 * w + ((idx >> 3) & 3);
      *reinterpret_cast<uint4*>(tile + panel * kPanelBytes + row * 128 + ((idx & 7) << 4)) =
          make_uint4(0u, 0u, 0u, 0u);
    }
    fence_proxy_async();  // generic stores -> read by wgmma (async proxy)
    named_bar_sync(kBarWg + w, 128);
  }
}

// Descriptor offsets (16-byte units) of k-step kk. QK^T: panel kk / 4, 32 bytes per
// step inside the panel's 128-byte rows. PV: P advances 32 bytes inside its rows, V
// advances 16 keys (2048 bytes).
constexpr int qk_off(int kk) { return ((kk / 4) * kPanelBytes + (kk % 4) * 32) / 16; }
constexpr int pv_off_p(int kk) { return kk * 32 / 16; }
constexpr int pv_off_v(int kk) { return kk * 16 * 128 / 16; }

template <MmaType kT, int... kK>
__device__ __forceinline__ void qk_steps(float (&s)[16], uint64_t dq, uint64_t dk,
                                         std::integer_sequence<int, kK...>) {
  (wgmma_m64n32k16_ss<kT, qk_off(kK), qk_off(kK)>(s, dq, dk, kK > 0 ? 1 : 0), ...);
}
template <MmaType kT, int... kK>
__device__ __forceinline__ void pv_steps(float (&o)[128], uint64_t dp, uint64_t dv,
                                         std::integer_sequence<int, kK...>) {
  (wgmma_m64n256k16_ss_tb<kT, pv_off_p(kK), pv_off_v(kK)>(o, dp, dv, 1), ...);
}

// S = Q K_w^T over 576 dims: 36 k-steps of 16, issued asynchronously (one group).
template <MmaType kT = MmaType::kBF16>
__device__ __forceinline__ void issue_qk(float (&s)[16], uint32_t q_addr, uint32_t stage_addr, int w) {
  const uint64_t dq = desc_k_sw128(q_addr);
  const uint64_t dk = desc_k_sw128(stage_addr + w * 32 * 128);  // keys 32w .. 32w + 31
  wgmma_fence();
  qk_steps<kT>(s, dq, dk, std::make_integer_sequence<int, kHeadDim / 16>{});
  wgmma_commit();
}

// O_w += P V_w: P [64 rows x 64 keys] from the rope panel, V_w = value dims
// [256w, 256w + 256) of the tile: 4 k-steps of 16 keys (one group).
template <MmaType kT = MmaType::kBF16>
__device__ __forceinline__ void issue_pv(float (&o)[128], uint32_t stage_addr, int w) {
  const uint64_t dp = desc_k_sw128(stage_addr + kRopePanel * kPanelBytes);
  const uint64_t dv = desc_mn_sw128(stage_addr + 4 * w * kPanelBytes, kPanelBytes);
  wgmma_fence();
  pv_steps<kT>(o, dp, dv, std::make_integer_sequence<int, kBlockN / 16>{});
  wgmma_commit();
}

// Kernel variants: the bf16 cache with the lockstep (0) or seesaw (1) consumer schedule, and the
// fp8 cache with the 64-row lockstep consumers (2, mla_decode_sm90_fp8.cuh) or the register-widened
// transposed consumers over TMA e4m3 stages for at most 16 / 32 rows (5 / 6,
// mla_decode_sm90_fp8_regs.cuh; 3 and 4, transposed consumers over producer-widened tiles, were
// replaced by them).
constexpr int kVariantLockstep = 0;
constexpr int kVariantSeesaw = 1;
constexpr int kVariantFp8 = 2;
constexpr int kVariantFp8Regs16 = 5;
constexpr int kVariantFp8Regs32 = 6;
// Variant 5's query rows (its 32-row form is variant 6); 0 for the other variants.
constexpr int regs_rows(int variant) {
  return variant == kVariantFp8Regs16 ? 16 : variant == kVariantFp8Regs32 ? 32 : 0;
}

// Writes one row of this warpgroup's 256 output values; kE selects the row of the
// accumulator fragment (0: row0, 2: row0 + 8).
template <int kE>
__device__ __forceinline__ void store_row_bf16(__nv_bfloat16* dst, const float (&o)[128], float inv,
                                               int quad) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(o[4 * j + kE] * inv, o[4 * j + kE + 1] * inv);
    *reinterpret_cast<__nv_bfloat162*>(dst + 8 * j + 2 * quad) = v;
  }
}
template <int kE>
__device__ __forceinline__ void store_row_f32(float* dst, const float (&o)[128], float inv, int quad) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    *reinterpret_cast<float2*>(dst + 8 * j + 2 * quad) =
        make_float2(o[4 * j + kE] * inv, o[4 * j + kE + 1] * inv);
  }
}

// One tile of the online softmax, shared by the lockstep and fp8 consumers: S (this warpgroup's
// 32 keys) to the log2 domain (`scale`) and masked, the row maxima exchanged with the other
// warpgroup through mbuf, the conditional rescale of O and l, P = exp2(S - base) over the
// tile's rope panel (p_panel), and the barrier after which the whole 64 x 64 P is in smem.
template <MmaType kT>
__device__ __forceinline__ void softmax_to_p(float (&s)[16], float (&o)[128], float scale, int key0,
                                             int mask_from, int lim0, int lim1, float* mbuf,
                                             uint8_t* p_panel, int w, int row0, int quad, float& m0,
                                             float& m1, float& l0, float& l1,
                                             [[maybe_unused]] trace::PhaseClock& ph_) {
  const float ninf = neg_inf();
  // Masked keys become -inf before any exp.
#pragma unroll
  for (int i = 0; i < 16; ++i) s[i] *= scale;
  if (key0 + kBlockN > mask_from) {
    mask_keys<4>(s, key0 + 32 * w, lim0, lim1, quad);
  }
  float mx0, mx1;
  row_max<4>(s, mx0, mx1);
  if (quad == 0) {
    mbuf[w * kBlockM + row0] = mx0;
    mbuf[w * kBlockM + row0 + 8] = mx1;
  }
  TS_MLA_PHASE(trace::kPhSoftmax1);
  named_bar_sync(kBarMax, 256);  // also: both warpgroups' QK(t) are complete
  TS_MLA_PHASE(trace::kPhBarMax);
  mx0 = fmaxf(mx0, mbuf[(w ^ 1) * kBlockM + row0]);
  mx1 = fmaxf(mx1, mbuf[(w ^ 1) * kBlockM + row0 + 8]);

  // Conditional rescale: both warpgroups see the same maxima and make the same
  // decision, so their P share one base per row.
  const bool up0 = mx0 > m0 + kRescaleThreshold;  // false while mx0 = -inf
  const bool up1 = mx1 > m1 + kRescaleThreshold;
  float alpha0 = 1.f, alpha1 = 1.f;
  if (up0) {
    alpha0 = exp2_approx(m0 - mx0);  // m0 = -inf -> 0 (O and l are still 0)
    m0 = mx0;
  }
  if (up1) {
    alpha1 = exp2_approx(m1 - mx1);
    m1 = mx1;
  }
  const float base0 = m0 == ninf ? 0.f : m0;  // a row with no key yet: exp2(-inf - 0) = 0
  const float base1 = m1 == ninf ? 0.f : m1;
  float sum0, sum1;
  exp2_rows<4>(s, base0, base1, sum0, sum1);
  l0 = l0 * alpha0 + sum0;
  l1 = l1 * alpha1 + sum1;

  // P over the rope panel: this warpgroup's keys are chunks 4w .. 4w + 3.
  store_p<4, kT>(s, p_panel, row0, quad, 4 * w);
  // Rescale O only in warps where some row moved its base (the previous PV has retired).
  if (__any_sync(0xffffffffu, up0 || up1)) scale_acc_rows(o, alpha0, alpha1);
  fence_proxy_async();  // P stores -> read by wgmma
  TS_MLA_PHASE(trace::kPhSoftmax2);
  named_bar_sync(kBarP, 256);  // the whole 64 x 64 P is in smem
  TS_MLA_PHASE(trace::kPhBarP);
}

// The end of a segment, shared by the consumers: row sums over both warpgroups, then either the
// final rows (bf16 out, lse) when this CTA had the whole sequence, or a normalised fp32 partial
// for the combine kernel. out_scale multiplies the output (the fp8 cache's kv_scale; 1 for bf16).
__device__ __forceinline__ void finish_segment(const MlaDecodeSm90Params& p, const SlotRange& sr,
                                               const Segment& seg, int mb, const float (&o)[128],
                                               float m0, float m1, float l0, float l1, float out_scale,
                                               float* ssum, int w, int row0, int quad) {
  const float ninf = neg_inf();
  const int row1 = row0 + 8;
  // Row sums: this thread's part -> quad -> both warpgroups.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  if (quad == 0) {
    ssum[w * kBlockM + row0] = l0;
    ssum[w * kBlockM + row1] = l1;
  }
  named_bar_sync(kBarEpi, 256);
  l0 += ssum[(w ^ 1) * kBlockM + row0];
  l1 += ssum[(w ^ 1) * kBlockM + row1];
  // A row that saw no key: l = 0 -> out 0, lse -inf.
  const float inv0 = l0 > 0.f ? out_scale / l0 : 0.f;
  const float inv1 = l1 > 0.f ? out_scale / l1 : 0.f;
  const float lse0 = l0 > 0.f ? (m0 + __log2f(l0)) * kLn2 : ninf;
  const float lse1 = l1 > 0.f ? (m1 + __log2f(l1)) * kLn2 : ninf;
  const int r0 = mb * kBlockM + row0, r1 = mb * kBlockM + row1;
  const int64_t seq_row = static_cast<int64_t>(seg.b) * p.rows;
  if (seg.t0 == 0 && seg.t1 == seg.tiles) {  // the whole sequence: final result
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + 256 * w;
    if (r0 < p.rows) store_row_bf16<0>(out + (seq_row + r0) * kHeadDimV, o, inv0, quad);
    if (r1 < p.rows) store_row_bf16<2>(out + (seq_row + r1) * kHeadDimV, o, inv1, quad);
    if (w == 0 && quad == 0) {
      if (r0 < p.rows) p.lse[seq_row + r0] = lse0;
      if (r1 < p.rows) p.lse[seq_row + r1] = lse1;
    }
  } else {  // one split: normalised fp32 partial, merged by the combine kernel
    const int64_t part_row = static_cast<int64_t>(partial_index(sr.slot, seg.start, sr.per_slot)) * p.rows;
    float* out = p.ws_out + 256 * w;
    if (r0 < p.rows) store_row_f32<0>(out + (part_row + r0) * kHeadDimV, o, inv0, quad);
    if (r1 < p.rows) store_row_f32<2>(out + (part_row + r1) * kHeadDimV, o, inv1, quad);
    if (w == 0 && quad == 0) {
      if (r0 < p.rows) p.ws_lse[part_row + r0] = lse0;
      if (r1 < p.rows) p.ws_lse[part_row + r1] = lse1;
    }
  }
  TS_MLA_TRACE_EVENT("decode", trace::kEpilogueDone);
}

}  // namespace dev
}  // namespace tokenspeed::mla_sm90

// The seesaw schedule and the fp8-cache variant use the helpers above (qk_off, pv_off_v,
// issue_qk / issue_pv, row_limit, softmax_to_p, finish_segment, the Q loads).
#include "mla/decode/mla_decode_sm90_fp8.cuh"
#include "mla/decode/mla_decode_sm90_seesaw.cuh"
#include "mla/decode/mla_decode_sm90_transposed.cuh"
#include "mla/decode/mla_decode_sm90_fp8_regs.cuh"

namespace tokenspeed::mla_sm90 {
namespace dev {

// kVariant: kVariantLockstep / kVariantSeesaw (bf16 cache) or kVariantFp8 (the lockstep schedule
// over f16 tiles widened from an fp8 cache: f16 Q and P, kv_scale folded into the score scale
// and the output; the producer zeroes the tail rows).
template <int kVariant>
__device__ __forceinline__ void run_consumer(const MlaDecodeSm90Params& p, const SlotRange& sr,
                                             uint8_t* smem, uint32_t smem_base, int mb) {
  constexpr bool kFp8 = kVariant == kVariantFp8;
  constexpr MmaType kT = kFp8 ? MmaType::kF16 : MmaType::kBF16;
  const int ctid = threadIdx.x - 128;  // 0 .. 255
  const int w = ctid >> 7;             // consumer warpgroup: keys 32w.., value dims 256w..
  const int wtid = ctid & 127;
  const int lane = ctid & 31;
  const int quad = lane & 3;
  // wgmma accumulator fragment: this thread holds rows row0 and row0 + 8, columns
  // 8j + 2 * quad + {0, 1} of every 8-column group j.
  const int row0 = ((wtid >> 5) << 4) + (lane >> 2);
  const int row1 = row0 + 8;
  const uint32_t q_addr = smem_base + kQOff;
  const uint32_t bar_empty0 = smem_base + kBarOff + kStages * 8;
  float* smax = reinterpret_cast<float*>(smem + kMaxOff);
  float* ssum = reinterpret_cast<float*>(smem + kSumOff);
  const float ninf = neg_inf();
  const float kv_scale = kFp8 ? __ldg(p.kv_scale) : 1.f;

  float o[128];
  float s[16];
  SegIter it{sr.first_b, sr.first_start};
  Segment seg;
  uint32_t iter = 0;
  TS_MLA_PHASE_DECL;
  while (next_segment(p, sr, it, seg)) {
    // Both warpgroups are done with the previous segment's Q (all wgmma waited).
    named_bar_sync(kBarSeg, 256);
    float scale = p.scale_log2;
    if constexpr (kFp8) {
      scale *= kv_scale * load_q_f16(p, seg.b, mb, smem + kQOff, ctid, ssum);
    } else {
      load_q(p, seg.b, mb, smem + kQOff, ctid);
    }
    fence_proxy_async();
    named_bar_sync(kBarSeg, 256);

    const int lim0 = row_limit(p, seg.len, mb * kBlockM + row0);
    const int lim1 = row_limit(p, seg.len, mb * kBlockM + row1);
    // Tiles reaching past mask_from may hold keys some row must not see.
    const int mask_from = seg.len - (p.causal ? p.q_len - 1 : 0);
    float m0 = ninf, m1 = ninf;  // exponent base of each row (log2 domain), -inf: none yet
    float l0 = 0.f, l1 = 0.f;    // this thread's part of each row's sum of P
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;

    if constexpr (kVariant == kVariantSeesaw) {
      seesaw_segment(p, seg, smem, smem_base, mb, iter, o, m0, m1, l0, l1, ph_);
    } else {
      TS_MLA_PHASE(trace::kPhOther);
      acquire_tile<!kFp8>(smem, smem_base, iter, seg.len - seg.t0 * kBlockN, w, wtid);
      TS_MLA_PHASE(trace::kPhAcquire);
      if (iter == 0) TS_MLA_TRACE_EVENT("decode", trace::kFirstTileFull);
      issue_qk<kT>(s, q_addr, smem_base + kStageOff + (iter & 1) * kTileBytes, w);

      for (int t = seg.t0; t < seg.t1; ++t, ++iter) {
        const int stage = iter & 1;
        const uint32_t stage_addr = smem_base + kStageOff + stage * kTileBytes;
        uint8_t* stage_ptr = smem + kStageOff + stage * kTileBytes;
        // In flight: PV(t-1) (if any), then QK(t). Groups retire in order.
        TS_MLA_PHASE(trace::kPhOther);
        TS_MLA_PHASE_TILE();
        wgmma_wait<1>();
        fence_regs(o);
        if (t > seg.t0 && lane == 0) mbar_arrive(bar_empty0 + (stage ^ 1) * 8);  // tile t-1 consumed
        TS_MLA_PHASE(trace::kPhWaitPv);
        wgmma_wait<0>();
        fence_regs(s);
        TS_MLA_PHASE(trace::kPhWaitQk);

        softmax_to_p<kT>(s, o, scale, t * kBlockN, mask_from, lim0, lim1, smax + (iter & 1) * 2 * kBlockM,
                         stage_ptr + kRopePanel * kPanelBytes, w, row0, quad, m0, m1, l0, l1, ph_);
        issue_pv<kT>(o, stage_addr, w);

        // Next tile's QK^T queues behind PV(t) on the tensor cores.
        if (t + 1 < seg.t1) {
          TS_MLA_PHASE(trace::kPhOther);
          acquire_tile<!kFp8>(smem, smem_base, iter + 1, seg.len - (t + 1) * kBlockN, w, wtid);
          TS_MLA_PHASE(trace::kPhAcquire);
          issue_qk<kT>(s, q_addr, smem_base + kStageOff + ((iter + 1) & 1) * kTileBytes, w);
        }
      }
      wgmma_wait<0>();
      fence_regs(o);
      if (lane == 0) mbar_arrive(bar_empty0 + ((iter - 1) & 1) * 8);
    }  // lockstep schedule
    TS_MLA_TRACE_EVENT("decode", trace::kMainLoopDone);

    finish_segment(p, sr, seg, mb, o, m0, m1, l0, l1, kv_scale, ssum, w, row0, quad);
  }
  TS_MLA_PHASE(trace::kPhOther);
  TS_MLA_PHASE_PRINT();
}

}  // namespace dev

// grid = slots * m_blocks (blockIdx.x = slot * m_blocks + mb: the row blocks of one
// key range run side by side and share the tiles in L2), 384 threads, kSmemBytes.
template <int kVariant>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_sm90_kernel(const __grid_constant__ CUtensorMap kv_map,
                           const __grid_constant__ MlaDecodeSm90Params p) {
  // Let the combine kernel (launched with programmatic stream serialization) be scheduled
  // as soon as SMs free up; it waits (griddepcontrol.wait) before reading our results.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  TS_MLA_TRACE_EVENT("decode", trace::kEntry);
  constexpr int kRegsRows = dev::regs_rows(kVariant);
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_base = dev::smem_u32(smem_raw);
  const uint32_t pad = (1024u - (raw_base & 1023u)) & 1023u;
  uint8_t* smem = smem_raw + pad;
  const uint32_t smem_base = raw_base + pad;
  const int tid = threadIdx.x;
  const int mb = blockIdx.x % p.m_blocks;
  const int slot = blockIdx.x / p.m_blocks;
  int* scratch = reinterpret_cast<int*>(smem + kPlanOff);

  // ---- The plan, from cache_seqlens (all threads) ----
  dev::SlotRange sr;
  sr.slot = slot;
  sr.capacity = p.max_pages << p.page_size_log2;
  int mine = 0;
  for (int b = tid; b < p.batch; b += kThreads) {
    mine += seq_cost(seq_tiles(clamp_len(__ldg(p.seqlens + b), sr.capacity)));
  }
  int total;
  dev::block_inclusive_scan(mine, scratch, total);
  sr.per_slot = dev::choose_per_slot(p, sr.capacity, cost_per_slot(total, p.slots, p.min_split), scratch);
  if (blockIdx.x == 0 && tid == 0) *p.ws_plan = sr.per_slot;  // for the combine kernel
  sr.x0 = slot * sr.per_slot;
  if (sr.x0 >= total) return;  // nothing for this slot (uniform across the CTA)
  sr.x1 = min(sr.x0 + sr.per_slot, total);
  // The sequence holding position x0: scan the costs in chunks of 384 sequences.
  int running = 0;
  for (int base = 0; base < p.batch; base += kThreads) {
    const int b = base + tid;
    const int c = b < p.batch ? seq_cost(seq_tiles(clamp_len(__ldg(p.seqlens + b), sr.capacity))) : 0;
    int chunk_total;
    const int start = running + dev::block_inclusive_scan(c, scratch, chunk_total) - c;
    if (c > 0 && start <= sr.x0 && sr.x0 < start + c) {
      scratch[16] = b;
      scratch[17] = start;
    }
    running += chunk_total;
    if (running > sr.x0) break;  // uniform: running is a block-wide value
  }
  if (tid == 0) {
    store_slot_range(scratch, sr);  // the first sequence (scratch[16, 18)) follows the barrier below
    const uint32_t bars = smem_base + kBarOff;
    for (int s = 0; s < kStages; ++s) {
      // full: the TMA producer's expect_tx, or one arrival per warp of an fp8 variant's producer
      // warpgroup; empty: one arrival per consumer warp
      dev::mbar_init(bars + s * 8, kVariant == dev::kVariantFp8 ? 4 : 1);
      dev::mbar_init(bars + (kStages + s) * 8, kConsumerWarps);
      for (int half = 0; half < 2; ++half) {                          // seesaw: per stage half
        dev::mbar_init(dev::half_bar(smem_base, 0, half, s), 1);
        dev::mbar_init(dev::half_bar(smem_base, 1, half, s), kConsumerWarps / 2);
      }
    }
    if constexpr (kRegsRows > 0) {
      constexpr int kRBarOff = dev::RLayout<kRegsRows>::kBarOff;
      for (int s = 0; s < dev::kRStages; ++s) {
        dev::mbar_init(smem_base + kRBarOff + s * 8, 1);                                  // full: expect_tx
        dev::mbar_init(smem_base + kRBarOff + (dev::kRStages + s) * 8, dev::kTWarps);  // empty: one consumer's warps
      }
    }
    dev::fence_barrier_init();
    if constexpr (kVariant < dev::kVariantFp8 || kRegsRows > 0) dev::prefetch_tensormap(&kv_map);
  }
  __syncthreads();
  sr.first_b = scratch[16];
  sr.first_start = scratch[17];
  TS_MLA_TRACE_EVENT("decode", trace::kPlanDone);

  if constexpr (kRegsRows > 0) {
    // one TMA thread, two consumer warpgroups on alternate tiles
    using L = dev::RLayout<kRegsRows>;
    if (tid < 128) {
      dev::setmaxnreg_dec<kProducerRegs>();
      if (tid == 0) dev::run_producer<dev::kRStages, dev::kRPanelBytes, 64>(&kv_map, p, sr, smem_base, L::kBarOff,
                                                                         L::kStageOff);
    } else {
      dev::setmaxnreg_inc<kConsumerRegs>();
      dev::run_consumer_r<kRegsRows>(p, smem, smem_base);
    }
  } else if constexpr (kVariant == dev::kVariantFp8) {
    if (tid < 128) {
      dev::setmaxnreg_dec<kProducerRegsFp8>();
      dev::run_producer_fp8(p, sr, smem, smem_base);
    } else {
      dev::setmaxnreg_inc<kConsumerRegsFp8>();
      dev::run_consumer<kVariant>(p, sr, smem, smem_base, mb);
    }
  } else if (tid < 128) {
    dev::setmaxnreg_dec<kProducerRegs>();
    if (tid == 0) {
      if constexpr (kVariant == dev::kVariantSeesaw) {
        dev::run_producer_halves(&kv_map, p, sr, smem_base);
      } else {
        dev::run_producer<kStages, kPanelBytes, 128>(&kv_map, p, sr, smem_base, kBarOff, kStageOff);
      }
    }
  } else {
    dev::setmaxnreg_inc<kConsumerRegs>();
    dev::run_consumer<kVariant>(p, sr, smem, smem_base, mb);
  }
}

}  // namespace tokenspeed::mla_sm90
