// The Hopper (sm_90a) MLA prefill kernel: FlashAttention-3-style warp specialisation,
// TMA + wgmma, persistent CTAs. Included by one .cu per head_dim_qk (only 192 is
// instantiated); the design and its reasoning are in csrc/mla/README.md.
//
// CTA = 3 warpgroups (384 threads), one CTA per SM (214,096 B of shared memory):
//   WG0  producer (setmaxnreg 40): one thread walks the schedule and issues TMA loads:
//        Q once per work tile, then K and V tiles of 128 keys through two 2-stage
//        rings (full / empty mbarriers). V lags K by one tile, the order the consumers
//        need them in.
//   WG1, WG2  consumers w = 0, 1 (setmaxnreg 232): rows 64w .. 64w + 63 of the
//        128-row query tile, each on its own:
//          S = Q K^T   wgmma m64n128k16 (A = Q, B = K, both smem, K-major), 192/16 k-steps
//          online softmax in registers (exp2, scale folded in, conditional rescale)
//          O += P V    wgmma m64n128k16 (A = P from registers, B = V smem, MN-major)
//        Per key tile t: QK(t) and PV(t+1) are issued together; the row maxima of S(t)
//        are taken while PV(t+1) is still on the tensor cores (intra-warpgroup
//        overlap), then P(t) = exp2(...) is packed to bf16 as it is computed. The two
//        warpgroups take turns issuing (named barriers 1 and 2), so one's softmax
//        overlaps the other's matrix products (ping-pong).
//
// Key tiles are visited from the last to the first: the tiles that need a mask
// (causal diagonal, end of the sequence) come first, the rest run without mask code.
// Causal tiles above the diagonal are never loaded.
//
// Shared memory (offsets from a 1024-byte aligned base), every operand in panels of
// [128 rows][64 bf16] = 16 KB, 128-byte swizzled (TMA SWIZZLE_128B = wgmma SW128):
//   Q       kHeadDimQK / 64 panels
//   K       2 stages x kHeadDimQK / 64 panels
//   V       2 stages x 2 panels
//   mbarriers q_full, q_empty, k_full[2], k_empty[2], v_full[2], v_empty[2]
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "mla/prefill/mla_prefill_sm90.h"
#include "mla/prefill/mla_prefill_sm90_layout.cuh"
#include "mla/prefill/mla_prefill_sm90_ptx.cuh"
#include "mla/prefill/mla_prefill_sm90_schedule.cuh"
#include "mla/prefill/mla_prefill_sm90_trace.cuh"

namespace tokenspeed::mla_prefill_sm90 {

namespace dev {

using namespace ptx;

// ---------------------------------------------------------------------------------
// Producer: one thread issues every TMA load of the CTA.
// ---------------------------------------------------------------------------------
template <int kHeadDimQK>
__device__ __forceinline__ void run_producer(const CUtensorMap* q_map, const CUtensorMap* k_map,
                                             const CUtensorMap* v_map, const MlaPrefillSm90Params& p,
                                             uint32_t smem_base) {
  using L = SmemLayout<kHeadDimQK>;
  Schedule<kHeadDimQK> sched(p);
  Work w;
  uint32_t q_iter = 0, kv_iter = 0;
  while (sched.next(w)) {
    const int m0 = w.m_block * kBlockM;
    const int tiles = kv_tiles_of(kv_end_of(w.lq, w.lk, m0, p.causal));
    if (tiles == 0) continue;  // no key visible: the consumers write zeros, nothing to load
    const int kvh = w.h / p.kv_group;

    // Q: the consumers release it after their last QK^T of the previous tile.
    mbar_wait(smem_base + L::kQEmpty, (q_iter & 1) ^ 1);
    mbar_arrive_expect_tx(smem_base + L::kQFull, L::kQBytes);
#pragma unroll
    for (int c = 0; c < L::kQkPanels; ++c) {
      tma_load_3d(smem_base + L::kQOff + c * L::kPanelBytes, q_map, 64 * c, w.h, w.q_start + m0,
                  smem_base + L::kQFull);
    }
    ++q_iter;

    // Rows past the tensor's end are zero-filled by TMA; rows past the sequence (the next
    // sequence's tokens) are masked in S and zeroed in V by the consumers.
    auto load_k = [&](uint32_t it, int n) {
      const uint32_t stage = it % L::kStages;
      mbar_wait(smem_base + L::kKEmpty + 8 * stage, ((it / L::kStages) & 1) ^ 1);
      const uint32_t full = smem_base + L::kKFull + 8 * stage;
      mbar_arrive_expect_tx(full, L::kKBytes);
#pragma unroll
      for (int c = 0; c < L::kQkPanels; ++c) {
        tma_load_3d(smem_base + L::kKOff + stage * L::kKBytes + c * L::kPanelBytes, k_map, 64 * c, kvh,
                    w.k_start + n * kBlockN, full);
      }
    };
    auto load_v = [&](uint32_t it, int n) {
      const uint32_t stage = it % L::kStages;
      mbar_wait(smem_base + L::kVEmpty + 8 * stage, ((it / L::kStages) & 1) ^ 1);
      const uint32_t full = smem_base + L::kVFull + 8 * stage;
      mbar_arrive_expect_tx(full, L::kVBytes);
#pragma unroll
      for (int c = 0; c < L::kVPanels; ++c) {
        tma_load_3d(smem_base + L::kVOff + stage * L::kVBytes + c * L::kPanelBytes, v_map, 64 * c, kvh,
                    w.k_start + n * kBlockN, full);
      }
    };
    // Consumers need K(t) then V(t - 1): load in that order, last tile first.
    load_k(kv_iter, tiles - 1);
    for (int n = tiles - 2; n >= 0; --n) {
      load_k(kv_iter + 1, n);
      load_v(kv_iter, n + 1);
      ++kv_iter;
    }
    load_v(kv_iter, 0);
    ++kv_iter;
  }
}

// ---------------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------------

// Descriptor offset (16-byte units) of QK^T k-step kk: panel kk / 4, 32 bytes per
// k-step inside the panel's 128-byte rows (same for Q and K: both panels are 128 rows).
template <int kPanelBytes>
constexpr int qk_off(int kk) {
  return ((kk / 4) * kPanelBytes + (kk % 4) * 32) / 16;
}
// P V k-step kk: 16 keys = 16 rows of 128 bytes further into V.
constexpr int pv_off(int kk) { return kk * 16 * 128 / 16; }

template <int kPanelBytes, int... kK>
__device__ __forceinline__ void qk_steps(float (&s)[64], uint64_t dq, uint64_t dk, std::integer_sequence<int, kK...>) {
  (wgmma_m64n128k16_ss<qk_off<kPanelBytes>(kK), qk_off<kPanelBytes>(kK), (kK > 0 ? 1 : 0)>(s, dq, dk), ...);
}
template <int... kK>
__device__ __forceinline__ void pv_steps(float (&o)[64], const uint32_t (&pr)[32], uint64_t dv,
                                         std::integer_sequence<int, kK...>) {
  (wgmma_m64n128k16_rs<pv_off(kK)>(o, pr[4 * kK], pr[4 * kK + 1], pr[4 * kK + 2], pr[4 * kK + 3], dv), ...);
}

// S = Q_w K^T (one commit group).
template <int kHeadDimQK>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t q_addr, uint32_t k_addr) {
  using L = SmemLayout<kHeadDimQK>;
  wgmma_fence();
  qk_steps<L::kPanelBytes>(s, desc_k_sw128(q_addr), desc_k_sw128(k_addr),
                           std::make_integer_sequence<int, kHeadDimQK / 16>{});
  wgmma_commit();
}

// O += P V (one commit group): 128 keys = 8 k-steps.
template <int kHeadDimQK>
__device__ __forceinline__ void issue_pv(float (&o)[64], const uint32_t (&pr)[32], uint32_t v_addr) {
  using L = SmemLayout<kHeadDimQK>;
  wgmma_fence();
  pv_steps(o, pr, desc_mn_sw128(v_addr, L::kPanelBytes), std::make_integer_sequence<int, kBlockN / 16>{});
  wgmma_commit();
}

// Per-row softmax state of this thread's two rows (row0 and row0 + 8): m is the exponent
// base in the log2 domain (-inf until the row has seen a key), l this thread's part of
// the row sum of P (reduced over the quad in the epilogue).
//
// One key tile of online softmax on S (accumulator layout: s[4j + e] is row0, key
// 8j + 2 quad + e; s[4j + 2 + e] is row0 + 8), in two halves around the wait for
// P V(n + 1), which still reads the P registers: softmax_max masks S (kMask: keys at or
// past the row's limit become -inf; lim_rel = limit - first key of the tile - 2 quad),
// takes the row maxima and moves the bases, returning whether a row of this thread moved
// (alpha: the factors O and l must be scaled by); softmax_exp_pack then writes
// P = exp2(S * scale_log2 - m) as bf16 straight into the A registers of the next P V
// (register x holds keys 2x, 2x + 1 of the accumulator order, which is exactly the
// m64nNk16 A fragment) and adds the row sums to l.
struct RowState {
  float m0, m1, l0, l1;
};

template <bool kMask>
__device__ __forceinline__ bool softmax_max(float (&s)[64], RowState& st, float scale_log2, int lim_rel0, int lim_rel1,
                                            float& alpha0, float& alpha1) {
  const float ninf = neg_inf();
  if (kMask) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[4 * j + e] = 8 * j + e < lim_rel0 ? s[4 * j + e] : ninf;  // select, never arithmetic (NaN rows)
        s[4 * j + 2 + e] = 8 * j + e < lim_rel1 ? s[4 * j + 2 + e] : ninf;
      }
    }
  }
  // Row maxima in four independent chains per row (a 32-long dependent chain costs latency).
  float c0[4], c1[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    c0[j] = fmaxf(s[4 * j], s[4 * j + 1]);
    c1[j] = fmaxf(s[4 * j + 2], s[4 * j + 3]);
  }
#pragma unroll
  for (int j = 4; j < 16; ++j) {
    c0[j % 4] = fmaxf(c0[j % 4], fmaxf(s[4 * j], s[4 * j + 1]));
    c1[j % 4] = fmaxf(c1[j % 4], fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  float mx0 = fmaxf(fmaxf(c0[0], c0[1]), fmaxf(c0[2], c0[3]));
  float mx1 = fmaxf(fmaxf(c1[0], c1[1]), fmaxf(c1[2], c1[3]));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  mx0 *= scale_log2;  // scale > 0: the max of the scaled scores; -inf stays -inf
  mx1 *= scale_log2;
  const bool up0 = mx0 > st.m0 + kRescaleThreshold;  // false while the row has no key
  const bool up1 = mx1 > st.m1 + kRescaleThreshold;
  alpha0 = 1.f;
  alpha1 = 1.f;
  if (up0) {
    alpha0 = exp2_approx(st.m0 - mx0);  // m = -inf -> 0 (O and l are still 0)
    st.m0 = mx0;
  }
  if (up1) {
    alpha1 = exp2_approx(st.m1 - mx1);
    st.m1 = mx1;
  }
  return up0 || up1;
}

__device__ __forceinline__ void softmax_exp_pack(const float (&s)[64], uint32_t (&pr)[32], RowState& st,
                                                 float scale_log2, float alpha0, float alpha1) {
  // A row without a key yet keeps base 0: exp2(-inf - 0) = 0, never -inf - (-inf).
  const float ninf = neg_inf();
  const float nb0 = st.m0 == ninf ? 0.f : -st.m0;
  const float nb1 = st.m1 == ninf ? 0.f : -st.m1;
  float p0[4] = {0.f, 0.f, 0.f, 0.f}, p1[4] = {0.f, 0.f, 0.f, 0.f};  // partial sums, four chains per row
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    float e[4];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      e[x] = exp2_approx(fmaf(s[4 * j + x], scale_log2, nb0));
      e[2 + x] = exp2_approx(fmaf(s[4 * j + 2 + x], scale_log2, nb1));
      p0[j % 4] += e[x];
      p1[j % 4] += e[2 + x];
    }
    pr[2 * j] = pack_bf16x2(e[0], e[1]);
    pr[2 * j + 1] = pack_bf16x2(e[2], e[3]);
  }
  st.l0 = st.l0 * alpha0 + ((p0[0] + p0[1]) + (p0[2] + p0[3]));
  st.l1 = st.l1 * alpha1 + ((p1[0] + p1[1]) + (p1[2] + p1[3]));
}

// The last, partial key tile may reach past the sequence into rows that are another
// sequence's tokens or unspecified memory (NaN, Inf): P = 0 there, but 0 * NaN = NaN,
// so this warpgroup zeroes the V rows of keys >= valid before its P V. The other
// warpgroup writes the same zeros; neither releases the stage before its own P V.
template <int kHeadDimQK>
__device__ __forceinline__ void zero_v_tail(uint8_t* v_stage, int valid, int w, int wtid) {
  using L = SmemLayout<kHeadDimQK>;
  const int n = (kBlockN - valid) * L::kVPanels * 8;  // 16-byte chunks
  for (int idx = wtid; idx < n; idx += 128) {
    const int row = valid + idx / (L::kVPanels * 8);
    const int panel = (idx >> 3) % L::kVPanels;
    *reinterpret_cast<uint4*>(v_stage + panel * L::kPanelBytes + row * 128 + ((idx & 7) << 4)) =
        make_uint4(0u, 0u, 0u, 0u);
  }
  fence_proxy_async();  // generic stores -> read by wgmma (async proxy)
  named_bar_sync(kBarWg + w, 128);
}

// Writes one output row (128 values of this thread's quad slice) as bf16; kE selects
// the accumulator row (0: row0, 2: row0 + 8).
template <int kE>
__device__ __forceinline__ void store_row(__nv_bfloat16* dst, const float (&o)[64], float inv, int quad) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    *reinterpret_cast<uint32_t*>(dst + 8 * j + 2 * quad) = pack_bf16x2(o[4 * j + kE] * inv, o[4 * j + kE + 1] * inv);
  }
}

template <int kHeadDimQK>
__device__ __forceinline__ void run_consumer(const MlaPrefillSm90Params& p, uint8_t* smem, uint32_t smem_base) {
  using L = SmemLayout<kHeadDimQK>;
  const int ctid = threadIdx.x - 128;  // 0 .. 255
  // Broadcast from lane 0 so the compiler sees a warp-uniform value: the smem addresses built
  // from it then live in uniform registers and feed the wgmma descriptors without R2UR moves.
  const int w = __shfl_sync(0xffffffffu, ctid >> 7, 0);  // consumer warpgroup: query rows 64w .. 64w + 63
  const int wtid = ctid & 127;
  const int lane = ctid & 31;
  const int quad = lane & 3;
  // wgmma accumulator fragment: this thread holds rows row0 and row0 + 8 of the
  // warpgroup's 64, columns 8j + 2 quad + {0, 1} of every 8-column group j.
  const int row0 = ((wtid >> 5) << 4) + (lane >> 2);
  const float ninf = neg_inf();
  const float scale_log2 = p.scale_log2;
  const uint32_t q_addr = smem_base + L::kQOff + w * 64 * 128;  // this warpgroup's 64 rows of each panel
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);

  // Warpgroup 0 takes the first turn on the tensor cores.
  if (w == 0) named_bar_arrive(kBarSched + 0, 256);

  Schedule<kHeadDimQK> sched(p);
  Work wk;
  uint32_t q_iter = 0, kv_iter = 0;
  float o[64];
  float s[64];
  uint32_t pr[32];
  while (sched.next(wk)) {
    const int m0 = wk.m_block * kBlockM;
    const int tiles = kv_tiles_of(kv_end_of(wk.lq, wk.lk, m0, p.causal));
    const int i0 = m0 + 64 * w + row0, i1 = i0 + 8;  // query positions in the sequence
    const int64_t tok0 = static_cast<int64_t>(wk.q_start) + i0, tok1 = tok0 + 8;
    const bool store0 = i0 < wk.lq && tok0 >= 0 && tok0 < p.total_q;
    const bool store1 = i1 < wk.lq && tok1 >= 0 && tok1 < p.total_q;
    __nv_bfloat16* out0 = out + (tok0 * p.heads + wk.h) * kHeadDimV;
    __nv_bfloat16* out1 = out + (tok1 * p.heads + wk.h) * kHeadDimV;

    if (tiles == 0) {  // no row of the tile sees a key: out 0, lse -inf
#pragma unroll
      for (int i = 0; i < 64; ++i) o[i] = 0.f;
      if (store0) store_row<0>(out0, o, 0.f, quad);
      if (store1) store_row<2>(out1, o, 0.f, quad);
      if (quad == 0) {
        if (store0) p.lse[tok0 * p.heads + wk.h] = ninf;
        if (store1) p.lse[tok1 * p.heads + wk.h] = ninf;
      }
      continue;
    }

    // Keys a row sees: [0, limit); bottom-right causal: limit = lk - lq + i + 1.
    const int lim0 = p.causal ? min(wk.lk, wk.lk - wk.lq + i0 + 1) : wk.lk;
    const int lim1 = p.causal ? min(wk.lk, wk.lk - wk.lq + i1 + 1) : wk.lk;
    const int unmasked = kv_unmasked_tiles(wk.lq, wk.lk, m0 + 64 * w, p.causal);
    RowState st{ninf, ninf, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;

    mbar_wait(smem_base + L::kQFull, q_iter & 1);

    // ---- first (last-in-sequence) key tile: QK^T alone ----
    int n = tiles - 1;
    {
      const uint32_t stage = kv_iter % L::kStages;
      mbar_wait(smem_base + L::kKFull + 8 * stage, (kv_iter / L::kStages) & 1);
      issue_qk<kHeadDimQK>(s, q_addr, smem_base + L::kKOff + stage * L::kKBytes);
      wgmma_wait<0>();
      fence_regs(s);
      if (lane == 0) {
        mbar_arrive(smem_base + L::kKEmpty + 8 * stage);
        if (n == 0) mbar_arrive(smem_base + L::kQEmpty);  // last QK^T of the tile: Q is free
      }
      float a0, a1;
      const int kd = n * kBlockN + 2 * quad;
      if (n >= unmasked) {
        softmax_max<true>(s, st, scale_log2, lim0 - kd, lim1 - kd, a0, a1);
      } else {
        softmax_max<false>(s, st, scale_log2, 0, 0, a0, a1);
      }
      softmax_exp_pack(s, pr, st, scale_log2, a0, a1);
    }

    // ---- steady state: QK(n) and PV(n + 1) in flight together; the row maxima of S(n)
    // overlap PV(n + 1), then P(n) is packed as it is computed ----
    bool k_ready = false, v_ready = false;  // the next tile's K / V are known to have landed
#pragma unroll 1
    for (n = tiles - 2; n >= 0; --n) {
      [[maybe_unused]] const int it_trace = tiles - 2 - n;
      PF_T(0);
      const uint32_t kv_next = kv_iter + 1;
      const uint32_t stage_k = kv_next % L::kStages;
      const uint32_t stage_v = kv_iter % L::kStages;
      if (!k_ready) mbar_wait(smem_base + L::kKFull + 8 * stage_k, (kv_next / L::kStages) & 1);
      if (!v_ready) mbar_wait(smem_base + L::kVFull + 8 * stage_v, (kv_iter / L::kStages) & 1);
      const int valid_v = wk.lk - (n + 1) * kBlockN;  // keys of tile n + 1 inside the sequence
      if (valid_v < kBlockN) zero_v_tail<kHeadDimQK>(smem + L::kVOff + stage_v * L::kVBytes, valid_v, w, wtid);
      PF_T(1);
      named_bar_sync(kBarSched + w, 256);  // our turn on the tensor cores
      PF_T(2);
      issue_qk<kHeadDimQK>(s, q_addr, smem_base + L::kKOff + stage_k * L::kKBytes);
      issue_pv<kHeadDimQK>(o, pr, smem_base + L::kVOff + stage_v * L::kVBytes);
      named_bar_arrive(kBarSched + (w ^ 1), 256);  // the other warpgroup's turn
      PF_T(3);
      wgmma_wait<1>();  // QK(n) done, PV(n + 1) may still run
      fence_regs(s);
      PF_T(4);
      if (lane == 0) {
        mbar_arrive(smem_base + L::kKEmpty + 8 * stage_k);
        if (n == 0) mbar_arrive(smem_base + L::kQEmpty);
      }
      float a0, a1;
      bool moved;
      const int kd = n * kBlockN + 2 * quad;
      if (n >= unmasked) {
        moved = softmax_max<true>(s, st, scale_log2, lim0 - kd, lim1 - kd, a0, a1);
      } else {
        moved = softmax_max<false>(s, st, scale_log2, 0, 0, a0, a1);
      }
      // The next iteration's K(n - 1) and V(n) (after the last iteration: V(0) of the last
      // P V) have usually landed by now: a non-blocking test here takes the barrier's
      // latency off the next issue.
      k_ready = mbar_test(smem_base + L::kKFull + 8 * ((kv_next + 1) % L::kStages), ((kv_next + 1) / L::kStages) & 1);
      v_ready = mbar_test(smem_base + L::kVFull + 8 * (kv_next % L::kStages), (kv_next / L::kStages) & 1);
      PF_T(5);
      wgmma_wait<0>();  // PV(n + 1) done: its V stage and P registers are free, O is final
      fence_regs(o);
      fence_regs(pr);
      PF_T(6);
      if (lane == 0) mbar_arrive(smem_base + L::kVEmpty + 8 * stage_v);
      if (__any_sync(0xffffffffu, moved)) scale_acc_rows(o, a0, a1);
      softmax_exp_pack(s, pr, st, scale_log2, a0, a1);
      PF_T(7);
      kv_iter = kv_next;
    }

    // ---- last P V ----
    {
      const uint32_t stage_v = kv_iter % L::kStages;
      mbar_wait(smem_base + L::kVFull + 8 * stage_v, (kv_iter / L::kStages) & 1);
      if (wk.lk < kBlockN) zero_v_tail<kHeadDimQK>(smem + L::kVOff + stage_v * L::kVBytes, wk.lk, w, wtid);
      issue_pv<kHeadDimQK>(o, pr, smem_base + L::kVOff + stage_v * L::kVBytes);
      wgmma_wait<0>();
      fence_regs(o);
      if (lane == 0) mbar_arrive(smem_base + L::kVEmpty + 8 * stage_v);
      ++kv_iter;
    }
    ++q_iter;

    // ---- epilogue: normalise, write out and lse straight from the registers ----
    float l0 = st.l0, l1 = st.l1;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    // A row that saw no key: l = 0 -> out 0, lse -inf.
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
    const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (store0) store_row<0>(out0, o, inv0, quad);
    if (store1) store_row<2>(out1, o, inv1, quad);
    if (quad == 0) {
      if (store0) p.lse[tok0 * p.heads + wk.h] = l0 > 0.f ? (st.m0 + __log2f(l0)) * kLn2 : ninf;
      if (store1) p.lse[tok1 * p.heads + wk.h] = l1 > 0.f ? (st.m1 + __log2f(l1)) * kLn2 : ninf;
    }
  }
}

}  // namespace dev

// grid = persistent CTAs (<= SMs), 384 threads, SmemLayout<kHeadDimQK>::kSmemBytes.
template <int kHeadDimQK>
__global__ void __launch_bounds__(kThreads, 1)
    mla_prefill_sm90_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                            const __grid_constant__ CUtensorMap v_map,
                            const __grid_constant__ MlaPrefillSm90Params p) {
  using L = SmemLayout<kHeadDimQK>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_base = dev::smem_u32(smem_raw);
  const uint32_t pad = (1024u - (raw_base & 1023u)) & 1023u;
  uint8_t* smem = smem_raw + pad;
  const uint32_t smem_base = raw_base + pad;

  if (threadIdx.x == 0) {
    dev::mbar_init(smem_base + L::kQFull, 1);  // the producer's expect_tx
    dev::mbar_init(smem_base + L::kQEmpty, kConsumerWarps);
    for (int s = 0; s < L::kStages; ++s) {
      dev::mbar_init(smem_base + L::kKFull + 8 * s, 1);
      dev::mbar_init(smem_base + L::kKEmpty + 8 * s, kConsumerWarps);  // one arrival per consumer warp
      dev::mbar_init(smem_base + L::kVFull + 8 * s, 1);
      dev::mbar_init(smem_base + L::kVEmpty + 8 * s, kConsumerWarps);
    }
    dev::fence_barrier_init();
    dev::prefetch_tensormap(&q_map);
    dev::prefetch_tensormap(&k_map);
    dev::prefetch_tensormap(&v_map);
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    dev::setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) dev::run_producer<kHeadDimQK>(&q_map, &k_map, &v_map, p, smem_base);
  } else {
    dev::setmaxnreg_inc<kConsumerRegs>();
    dev::run_consumer<kHeadDimQK>(p, smem, smem_base);
  }
}

}  // namespace tokenspeed::mla_prefill_sm90
