// The register-widened transposed consumers of the Hopper MLA decode (kernel variants 5 and 6: an
// fp8 cache with at most 16 or 32 query rows, kN); included by mla_decode_sm90_kernel.cuh after
// the column softmax they share (mla_decode_sm90_transposed.cuh).
//
// A transposed consumer over f16 tiles that producer warpgroups widen (variant 4, and variant 3,
// its 16-row form) is load-bound: the producers' registers hold two 36 KB tiles of codes per SM, at
// that depth the loads reach ~2.3 TB/s (scripts/dev/fp8_decode_probe.cu), and f16 stages leave no
// shared memory for more. Here the tiles stay e4m3 in shared memory: one TMA thread streams 36 KB
// stages (4 in flight: the bf16 kernel's depth in bytes), and the consumers widen the codes in
// registers, where wgmma takes its A operand:
//   S^T [64 keys x kN] = K Q^T    m64nNk16, A = K from ldmatrix + cvt, B = Q (f16, smem)
//   O^T [512 x kN]    += V^T P^T  8 blocks of m64nNk16, A = V^T from 8-byte loads, byte
//                                 permutes + cvt, B = P [kN rows x 64 keys] (f16, smem)
// Two consumer warpgroups take alternate tiles, each with its own online softmax state (one's
// widening and softmax overlap the other's wgmma); the segment's end merges them. At 32 rows O^T
// takes 128 registers per thread: the slot range is re-read from shared memory at each segment
// (load_slot_range) rather than held across the tile loop, and the merge borrows the Q and P
// regions (RLayout).
//
// A fragments come as they are cheapest to build and the other operand follows:
//   * QK: a thread's 4 consecutive codes (dims 4q .. 4q + 3 of a 16-dim k-step, q = lane % 4)
//     widen to k = 2q, 2q + 1 and 2q + 8, 2q + 9 of the fragment, so Q is stored with that
//     permutation inside every 16-dim block (load_q_perm);
//   * PV: the M rows of block b are value dims 16 g + 2 b and + 1 for thread group g = 8 warp +
//     lane / 4, so a thread reads 16 consecutive dims of a key (two 8-byte loads, one per group of
//     4 blocks) and its 16 output dims are consecutive; the keys keep their order (P is stored as
//     the softmax writes it).
// Stage layout: 9 panels of [64 keys][64 codes], 64-byte swizzle (TMA's SWIZZLE_64B: 16-byte chunk
// c of key row k at chunk c ^ ((k / 2) % 4)), which keeps both access patterns conflict-free.
// (5 panels of 128 codes, 128-byte boxes with the last half zero-filled past dim 576, were no
// faster: 119.2 us at 128 x 16 x 4K, the TMA path alone 111.9 vs 112.3.)
// Keys past the sequence hold stale bytes (NaN codes included): their rows are zeroed in the stage
// before QK^T (zero_tail) and their scores masked.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "common/sm90_ptx.cuh"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_layout.cuh"
#include "mla/decode/mla_decode_sm90_schedule.cuh"
#include "mla/decode/mla_decode_sm90_trace.cuh"

namespace tokenspeed::mla_sm90::dev {

// ---- layout (inside the shared layout's Q and stage regions, below kMaxOff) ----
constexpr int kRPanelBytes = 64 * 64;               // [64 keys][64 codes]
constexpr int kRStageBytes = kPanels * kRPanelBytes;  // 36864
// Even, so stage s is always read by consumer warpgroup s % 2 (tiles alternate between them):
// a warpgroup's waits on a stage's barriers are then never two phases apart.
constexpr int kRStages = 4;

// Offsets for kN query rows (16 or 32). The second consumer hands its O^T over block by block
// (128 threads x kN / 2 floats each) at the segment's end: above the barriers where it fits, the
// first kLowBlocks blocks over the Q and P regions (at 32 rows; dead once both consumers are past
// their last tile, finish_segment_r waits for that).
template <int kN>
struct RLayout {
  static constexpr int kQPanelBytes = kN * 128;             // Q: [kN rows][64 dims] f16, 128-byte swizzle
  static constexpr int kQOff = 0;                           // 9 panels
  static constexpr int kPBytes = kN * 128;                  // P: [kN rows][64 keys] f16
  static constexpr int kPOff = kQOff + kPanels * kQPanelBytes;  // consumer w's at + w * kPBytes
  static constexpr int kStageOff = kPOff + 2 * kPBytes;
  static constexpr int kBarOff = kStageOff + kRStages * kRStageBytes;  // uint64 full[4], empty[4]
  static constexpr int kHighOff = kBarOff + 1024;
  static constexpr int kBlockBytes = 128 * (kN / 2) * 4;
  static constexpr int kTailBytes = 2 * kN * 4 + kTWarps * kTStride * 4;  // m, l; row-sum exchange
  static constexpr int kHighBlocks = (kMaxOff - kHighOff - kTailBytes) / kBlockBytes < kDimBlocks
                                         ? (kMaxOff - kHighOff - kTailBytes) / kBlockBytes
                                         : kDimBlocks;
  static constexpr int kLowBlocks = kDimBlocks - kHighBlocks;
  static constexpr int kMlOff = kHighOff + kHighBlocks * kBlockBytes;  // the second consumer's m[kN], l[kN]
  static constexpr int kSum2Off = kMlOff + 2 * kN * 4;                 // its row-sum exchange
  static constexpr int merge_off(int b) {
    return b < kLowBlocks ? kQOff + b * kBlockBytes : kHighOff + (b - kLowBlocks) * kBlockBytes;
  }
  static_assert(kSum2Off + kTWarps * kTStride * 4 <= kMaxOff, "variant 5 / 6 layout overlaps the shared exchange buffers");
  static_assert(kLowBlocks * kBlockBytes <= kStageOff, "merge blocks reach into the stages");
  static_assert(kStageOff % 1024 == 0 && kPOff % 1024 == 0, "swizzle atoms need their alignment");
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D[64 x kN] (+)= A[64 x 16] B[kN x 16]^T, A f16 from registers, B f16 K-major in smem (desc_b +
// kOffB 16-byte units, added inside the asm).
template <int kN, int kOffB>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(kN == 16 || kN == 32, "variants 5 / 6 run 16 / 32 query rows");
  if constexpr (kN == 16) {
    asm volatile(
        "{\n.reg .pred p;\n.reg .b64 db;\n"
        "setp.ne.b32 p, %13, 0;\n"
        "add.s64 db, %12, %14;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, db, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kOffB));
  } else {
    asm volatile(
        "{\n.reg .pred p;\n.reg .b64 db;\n"
        "setp.ne.b32 p, %21, 0;\n"
        "add.s64 db, %20, %22;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "
        "%11, %12, %13, %14, %15}, {%16, %17, %18, %19}, db, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kOffB));
  }
}

// Q rows 0 .. kN - 1 as f16 after the power-of-two scale (q_f16_scale), each 16-dim block stored
// with the QK fragment's permutation: logical k 2i + e <- dim 4i + e, k 8 + 2i + e <- dim 4i + 2 + e
// (i < 4). Thread (row n = ctid / 4, part) moves blocks part + 4 j (j < 9) of its row; the 256
// consumer threads cover rows 0 .. 63 (rows >= p.rows are zero; p.rows <= kN). Returns 2^-e.
template <int kN>
__device__ __forceinline__ float load_q_perm(const MlaDecodeSm90Params& p, int b, uint8_t* q_smem, int ctid,
                                             float* red) {
  const int n = ctid >> 2, part = ctid & 3;
  const bool real = n < p.rows;
  uint4 v[18];
  const uint4* src = nullptr;
  if (real) {
    const int i = n / p.heads, h = n - i * p.heads;
    src = reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.q) + b * p.q_stride_b +
                                         i * p.q_stride_i + h * p.q_stride_h);
  }
#pragma unroll
  for (int j = 0; j < 9; ++j) {
    const int m = part + 4 * j;  // 16-dim block
    v[2 * j] = real ? __ldg(src + 2 * m) : make_uint4(0u, 0u, 0u, 0u);
    v[2 * j + 1] = real ? __ldg(src + 2 * m + 1) : make_uint4(0u, 0u, 0u, 0u);
  }
  const float2 scale = q_f16_scale<8>(v, ctid, red);
  if (n >= kN) return scale.y;
#pragma unroll
  for (int j = 0; j < 9; ++j) {
    const uint32_t raw[8] = {v[2 * j].x, v[2 * j].y, v[2 * j].z, v[2 * j].w,
                             v[2 * j + 1].x, v[2 * j + 1].y, v[2 * j + 1].z, v[2 * j + 1].w};
    uint32_t w[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = bf16x2_to_f16x2_scaled(raw[i], scale.x);
    // word i holds dims 2i, 2i + 1: logical words 0..3 <- 0, 2, 4, 6 and 4..7 <- 1, 3, 5, 7
    const int m = part + 4 * j;
    uint8_t* row = q_smem + (m >> 2) * RLayout<kN>::kQPanelBytes + n * 128;
    const int c0 = 2 * (m & 3);
    *reinterpret_cast<uint4*>(row + ((c0 ^ (n & 7)) << 4)) = make_uint4(w[0], w[2], w[4], w[6]);
    *reinterpret_cast<uint4*>(row + (((c0 + 1) ^ (n & 7)) << 4)) = make_uint4(w[1], w[3], w[5], w[7]);
  }
  return scale.y;
}

// QK^T over panel kG (dims 64 kG ..): the A fragments of its 4 k-steps from two ldmatrix.x4
// (rows key, key + 8; chunks 0, 1 then 2, 3), widened; 4 wgmma (one group).
template <int kN, int kG>
__device__ __forceinline__ void qk_r_panel(float (&s)[kN / 2], uint32_t (&a)[16], uint32_t stage_addr,
                                           uint32_t lm_off0, uint32_t lm_off1, uint64_t dq) {
  uint32_t m01[4], m23[4];
  ldmatrix_x4(stage_addr + kG * kRPanelBytes + lm_off0, m01);
  ldmatrix_x4(stage_addr + kG * kRPanelBytes + lm_off1, m23);
  wgmma_wait<1>();  // the group that used this buffer (two groups ago) has retired
  const uint32_t w[8] = {m01[0], m01[1], m01[2], m01[3], m23[0], m23[1], m23[2], m23[3]};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    // w[2c]: row key, chunk c; w[2c + 1]: row key + 8 (ldmatrix matrices 0..3 = (c0,r) (c0,r8) (c1,r) (c1,r8))
    const uint32_t lo = w[2 * c], hi = w[2 * c + 1];
    e4m3x4_to_f16x4(lo, a[4 * c + 0], a[4 * c + 2]);
    e4m3x4_to_f16x4(hi, a[4 * c + 1], a[4 * c + 3]);
  }
  wgmma_fence();
  constexpr int kOff = kG * RLayout<kN>::kQPanelBytes / 16;  // Q panel kG; 16 dims (32 bytes) per k-step
  wgmma_rs<kN, kOff + 0>(s, reinterpret_cast<const uint32_t(&)[4]>(a[0]), dq, kG > 0 ? 1 : 0);
  wgmma_rs<kN, kOff + 2>(s, reinterpret_cast<const uint32_t(&)[4]>(a[4]), dq, 1);
  wgmma_rs<kN, kOff + 4>(s, reinterpret_cast<const uint32_t(&)[4]>(a[8]), dq, 1);
  wgmma_rs<kN, kOff + 6>(s, reinterpret_cast<const uint32_t(&)[4]>(a[12]), dq, 1);
  wgmma_commit();
}

template <int kN, int... kG>
__device__ __forceinline__ void qk_r(float (&s)[kN / 2], uint32_t (&a0)[16], uint32_t (&a1)[16], uint32_t stage_addr,
                                     uint32_t lm_off0, uint32_t lm_off1, uint64_t dq, std::integer_sequence<int, kG...>) {
  ((kG % 2 == 0 ? qk_r_panel<kN, kG>(s, a0, stage_addr, lm_off0, lm_off1, dq)
                : qk_r_panel<kN, kG>(s, a1, stage_addr, lm_off0, lm_off1, dq)),
   ...);
}

// Bytes s, s + 1 of x (a key's codes of dims d, d + 1) and of y (the next key's) -> the two f16x2
// A registers (d: keys x, y) and (d + 1: keys x, y).
template <int kS>
__device__ __forceinline__ void pair_keys(uint32_t x, uint32_t y, uint32_t& r0, uint32_t& r1) {
  constexpr uint32_t sel = kS | ((4 + kS) << 4) | ((kS + 1) << 8) | ((5 + kS) << 12);
  uint32_t t;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(t) : "r"(x), "r"(y), "n"(sel));
  e4m3x4_to_f16x4(t, r0, r1);
}

// The four keys 16 kK + 2 q + {0, 1, 8, 9} of k-step kK, dims 16 g + 8 kH .. + 7: half kH of each
// key's 16-byte chunk (8-byte loads: at 32 rows a whole chunk per key held across both groups
// spills). Keys past the sequence read zeros (zero_tail).
template <int kK, int kH>
__device__ __forceinline__ void load_v_half(const uint8_t* stage, int g, int quad, uint2 (&v)[4]) {
  // Key row k's chunk c sits at chunk c ^ ((k / 2) % 4), and (k / 2) % 4 = quad for all of these
  // keys: one base per thread, constant offsets (nothing per key for the compiler to keep live).
  const uint8_t* base = stage + (g >> 2) * kRPanelBytes + 8 * kH + 2 * quad * 64 + (((g & 3) ^ quad) << 4);
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = *reinterpret_cast<const uint2*>(base + (16 * kK + (i & 1) + 8 * (i >> 1)) * 64);
}

// A sequence's partial last tile: the codes of keys valid .. 63 (stale bytes, NaN codes included;
// P = 0 there would still give 0 x NaN in PV) become zeros, by the warpgroup that owns the stage,
// before its QK^T and PV read them; the barrier bar (128 threads) publishes them. (Their scores
// are masked besides.) Per-element selects on every tile's V codes cost more. The TMA unit
// refills the stage after the release: fence.proxy.async orders these generic stores before that.
__device__ __forceinline__ void zero_tail(uint8_t* stage, int valid, int wtid, int bar) {
  const int chunks = (kBlockN - valid) * (kPanels * 4);  // 16-byte chunks: 4 per 64-byte panel row
  for (int i = wtid; i < chunks; i += 128) {
    const int row = valid + i / (kPanels * 4), panel = (i >> 2) % kPanels, chunk = i & 3;  // whole rows: swizzle irrelevant
    *reinterpret_cast<uint4*>(stage + panel * kRPanelBytes + row * 64 + chunk * 16) = make_uint4(0u, 0u, 0u, 0u);
  }
  fence_proxy_async();
  named_bar_sync(bar, 128);
}

// O^T blocks 4 kH .. 4 kH + 3, k-step kK: A from the four keys' codes of dims 16 g + 8 kH .. + 7
// (block 4 kH + i: dims 16 g + 2 (4 kH + i), + 1 = bytes 2 i, 2 i + 1 of the half), one group.
template <int kN, int kK, int kH>
__device__ __forceinline__ void pv_r_group(float (&o)[kDimBlocks][kN / 2], uint32_t (&a)[16], const uint8_t* stage,
                                           int g, int quad, uint64_t dp) {
  uint2 v[4];
  load_v_half<kK, kH>(stage, g, quad, v);
  wgmma_wait<1>();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w0 = i < 2 ? v[0].x : v[0].y;
    const uint32_t w1 = i < 2 ? v[1].x : v[1].y;
    const uint32_t w2 = i < 2 ? v[2].x : v[2].y;
    const uint32_t w3 = i < 2 ? v[3].x : v[3].y;
    if (i % 2 == 0) {
      pair_keys<0>(w0, w1, a[4 * i + 0], a[4 * i + 1]);
      pair_keys<0>(w2, w3, a[4 * i + 2], a[4 * i + 3]);
    } else {
      pair_keys<2>(w0, w1, a[4 * i + 0], a[4 * i + 1]);
      pair_keys<2>(w2, w3, a[4 * i + 2], a[4 * i + 3]);
    }
  }
  wgmma_fence();
  wgmma_rs<kN, pv_off_p(kK)>(o[4 * kH + 0], reinterpret_cast<const uint32_t(&)[4]>(a[0]), dp, 1);
  wgmma_rs<kN, pv_off_p(kK)>(o[4 * kH + 1], reinterpret_cast<const uint32_t(&)[4]>(a[4]), dp, 1);
  wgmma_rs<kN, pv_off_p(kK)>(o[4 * kH + 2], reinterpret_cast<const uint32_t(&)[4]>(a[8]), dp, 1);
  wgmma_rs<kN, pv_off_p(kK)>(o[4 * kH + 3], reinterpret_cast<const uint32_t(&)[4]>(a[12]), dp, 1);
  wgmma_commit();
}

template <int kN, int kK>
__device__ __forceinline__ void pv_r_kstep(float (&o)[kDimBlocks][kN / 2], uint32_t (&a0)[16], uint32_t (&a1)[16],
                                           const uint8_t* stage, int g, int quad, uint64_t dp) {
  pv_r_group<kN, kK, 0>(o, a0, stage, g, quad, dp);
  pv_r_group<kN, kK, 1>(o, a1, stage, g, quad, dp);
}

// This warpgroup's row sums over its tiles: per thread part -> quad lanes -> 4 warps (ssum, its
// barrier); l[c] becomes column c's total.
template <int kC>
__device__ __forceinline__ void column_sums(float (&l)[kC], float* ssum, int bar, int warp, int lane, int quad) {
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
#pragma unroll
    for (int c = 0; c < kC; ++c) l[c] += __shfl_xor_sync(0xffffffffu, l[c], off);
  }
  if (lane < 4) {
#pragma unroll
    for (int c = 0; c < kC; ++c) ssum[warp * kTStride + t_row(c, quad)] = l[c];
  }
  named_bar_sync(bar, 128);
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int n = t_row(c, quad);
    l[c] = (ssum[n] + ssum[kTStride + n]) + (ssum[2 * kTStride + n] + ssum[3 * kTStride + n]);
  }
}

// The end of a segment. The two consumers hold the online softmax of alternate tiles: the
// second writes its O^T fragments and (base, sum) per row to smem, the first merges them into
// its own and stores the rows (bf16 out and lse when this CTA had the whole sequence, else a
// normalised fp32 partial). A thread holds dims 16 g .. 16 g + 15 of each of its columns:
// o[b][i] -> dim 16 g + 2 b, o[b][i + 2] -> + 1.
template <int kN>
__device__ __forceinline__ void finish_segment_r(const MlaDecodeSm90Params& p, const SlotRange& sr,
                                                 const Segment& seg, float (&o)[kDimBlocks][kN / 2],
                                                 float (&m)[kN / 4], float (&l)[kN / 4], float out_scale,
                                                 uint8_t* smem, int w, int wtid) {
  using L = RLayout<kN>;
  constexpr int kC = kN / 4;
  const int warp = wtid >> 5, lane = wtid & 31, quad = lane & 3;
  float* ssum = reinterpret_cast<float*>(smem + (w == 0 ? kSumOff : L::kSum2Off));
  column_sums<kC>(l, ssum, w == 0 ? kBarEpi : kBarEpi2, warp, lane, quad);
  float* merge_ml = reinterpret_cast<float*>(smem + L::kMlOff);  // m[kN], l[kN]
  // Blocks over Q and P: both consumers must be past their last QK^T and PV.
  if constexpr (L::kLowBlocks > 0) named_bar_sync(kBarMerge, 256);
  if (w == 1) {
#pragma unroll
    for (int b = 0; b < kDimBlocks; ++b) {
      float* blk = reinterpret_cast<float*>(smem + L::merge_off(b));
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) blk[i * 128 + wtid] = o[b][i];
    }
    if (warp == 0 && lane < 4) {
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        merge_ml[t_row(c, quad)] = m[c];
        merge_ml[kN + t_row(c, quad)] = l[c];
      }
    }
    named_bar_sync(kBarMerge, 256);
    return;
  }
  named_bar_sync(kBarMerge, 256);
  const float ninf = neg_inf();
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int n = t_row(c, quad);
    const float m1 = merge_ml[n], l1 = merge_ml[kN + n];
    const float top = fmaxf(m[c], m1);
    const float f0 = m[c] == ninf ? 0.f : exp2_approx(m[c] - top);
    const float f1 = m1 == ninf ? 0.f : exp2_approx(m1 - top);
    const int i = 4 * (c >> 1) + (c & 1);
#pragma unroll
    for (int b = 0; b < kDimBlocks; ++b) {
      const float* blk = reinterpret_cast<const float*>(smem + L::merge_off(b));
      o[b][i] = o[b][i] * f0 + blk[i * 128 + wtid] * f1;
      o[b][i + 2] = o[b][i + 2] * f0 + blk[(i + 2) * 128 + wtid] * f1;
    }
    l[c] = l[c] * f0 + l1 * f1;
    m[c] = top;
  }
  const int g = 8 * warp + (lane >> 2);
  const bool whole = seg.t0 == 0 && seg.t1 == seg.tiles;
  const int64_t first_row =
      whole ? static_cast<int64_t>(seg.b) * p.rows
            : static_cast<int64_t>(partial_index(sr.slot, seg.start, sr.per_slot)) * p.rows;
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int n = t_row(c, quad);
    if (n >= p.rows) continue;
    // A row that saw no key: l = 0 -> out 0, lse -inf.
    const float inv = l[c] > 0.f ? out_scale / l[c] : 0.f;
    const float lse = l[c] > 0.f ? (m[c] + __log2f(l[c])) * kLn2 : ninf;
    const int i = 4 * (c >> 1) + (c & 1);
    const int64_t at = (first_row + n) * kHeadDimV + 16 * g;
    if (whole) {
      uint32_t u[8];
#pragma unroll
      for (int b = 0; b < kDimBlocks; ++b) u[b] = pack_bf16x2(o[b][i] * inv, o[b][i + 2] * inv);
      uint4* out = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + at);
      out[0] = make_uint4(u[0], u[1], u[2], u[3]);
      out[1] = make_uint4(u[4], u[5], u[6], u[7]);
      if (warp == 0 && lane < 4) p.lse[first_row + n] = lse;
    } else {
      float4* out = reinterpret_cast<float4*>(p.ws_out + at);
#pragma unroll
      for (int b = 0; b < kDimBlocks; b += 2) {
        out[b / 2] = make_float4(o[b][i] * inv, o[b][i + 2] * inv, o[b + 1][i] * inv, o[b + 1][i + 2] * inv);
      }
      if (warp == 0 && lane < 4) p.ws_lse[first_row + n] = lse;
    }
  }
}

// The two consumer warpgroups (threads 128 .. 383) over kN query rows: consumer w takes the tiles
// of every segment whose position in the CTA's tile order is w mod 2 (so stages w, w + 2), with
// its own online softmax state; finish_segment_r merges the two.
template <int kN>
__device__ __forceinline__ void run_consumer_r(const MlaDecodeSm90Params& p, uint8_t* smem, uint32_t smem_base) {
  using L = RLayout<kN>;
  constexpr MmaType kT = MmaType::kF16;
  constexpr int kC = kN / 4;
  const int ctid = threadIdx.x - 128;  // 0 .. 255
  const int w = ctid >> 7, wtid = ctid & 127;
  const int warp = wtid >> 5, lane = wtid & 31, quad = lane & 3;
  const int g = 8 * warp + (lane >> 2);
  const uint32_t bar_full0 = smem_base + L::kBarOff;
  const uint32_t bar_empty0 = bar_full0 + kRStages * 8;
  float* smax = reinterpret_cast<float*>(smem + kMaxOff) + w * kTWarps * kTStride;
  const int bar_max = w == 0 ? kBarMax : kBarMax2;
  const int bar_p = w == 0 ? kBarP : kBarP2;
  uint8_t* p_panel = smem + L::kPOff + w * L::kPBytes;
  const float kv_scale = __ldg(p.kv_scale);
  const uint64_t dq = desc_k_sw128(smem_base + L::kQOff);
  const uint64_t dp = desc_k_sw128(smem_base + L::kPOff + w * L::kPBytes);
  // ldmatrix row addresses (within a panel): lane l gives row 16 warp + 8 ((l / 8) % 2) + l % 8 of
  // matrix l / 8, chunk (l / 16) (+ 2 for the second load), swizzled.
  const int lm_key = 16 * warp + 8 * ((lane >> 3) & 1) + (lane & 7);
  const uint32_t lm_off0 = lm_key * 64 + (((lane >> 4) ^ ((lm_key >> 1) & 3)) << 4);
  const uint32_t lm_off1 = lm_off0 ^ 32;  // chunk (l / 16) + 2 = chunk XOR 2, swizzled alike

  float o[kDimBlocks][kN / 2];
  float s[kN / 2];
  uint32_t a0[16], a1[16];
  const int* plan = reinterpret_cast<const int*>(smem + kPlanOff);
  SegIter it{load_slot_range(plan).first_b, load_slot_range(plan).first_start};
  Segment seg;
  uint32_t iter = 0;
  while (next_segment(p, load_slot_range(plan), it, seg)) {
    named_bar_sync(kBarSeg, 256);  // both consumers are done with the previous segment
    const float scale = p.scale_log2 * kv_scale *
                        load_q_perm<kN>(p, seg.b, smem + L::kQOff, ctid, reinterpret_cast<float*>(smem + kSumOff));
    fence_proxy_async();
    named_bar_sync(kBarSeg, 256);

    float m[kC], l[kC];
    const int mask_from = begin_columns<kN>(p, seg.len, m, l, o);
    for (int t = seg.t0; t < seg.t1; ++t, ++iter) {
      if (static_cast<int>(iter & 1) != w) continue;
      const uint32_t stage = iter % kRStages;
      const uint32_t stage_addr = smem_base + L::kStageOff + stage * kRStageBytes;
      uint8_t* stage_ptr = smem + L::kStageOff + stage * kRStageBytes;
      mbar_wait(bar_full0 + stage * 8, (iter / kRStages) & 1);
      if constexpr (trace::kProbe == trace::kProbeProducers) {  // probe: release each tile once full
        if (lane == 0) mbar_arrive(bar_empty0 + stage * 8);
        continue;
      }
      const int valid = seg.len - t * kBlockN;
      if (valid < kBlockN) zero_tail(stage_ptr, valid, wtid, bar_p);
      qk_r<kN>(s, a0, a1, stage_addr, lm_off0, lm_off1, dq, std::make_integer_sequence<int, kPanels>{});
      wgmma_wait<0>();
      fence_regs(s);
      softmax_t<kT, kN>(s, o, scale, t * kBlockN, t * kBlockN + kBlockN > mask_from, p, seg.len, smax, p_panel, warp,
                        lane, quad, m, l, bar_max, bar_p);
      pv_r_kstep<kN, 0>(o, a0, a1, stage_ptr, g, quad, dp);
      pv_r_kstep<kN, 1>(o, a0, a1, stage_ptr, g, quad, dp);
      pv_r_kstep<kN, 2>(o, a0, a1, stage_ptr, g, quad, dp);
      pv_r_kstep<kN, 3>(o, a0, a1, stage_ptr, g, quad, dp);
      // Every read of this stage is in registers now (the last group's A was built from it).
      // Measured and not kept (H100, 2026-11-24): reading the V rows right after QK^T and
      // releasing the stage before the softmax (64 more live registers): 128 x 16 x 4K 116.7 -> 124.1 us.
      __syncwarp();
      if (lane == 0) mbar_arrive(bar_empty0 + stage * 8);
      // PV retired before the next tile: with it in flight across the loop ptxas serialises every
      // wgmma (C7514, the softmax's reads of O); the other consumer fills the tensor cores meanwhile.
      wgmma_wait<0>();
      fence_o<kN>(o);
    }
    finish_segment_r<kN>(p, load_slot_range(plan), seg, o, m, l, kv_scale, smem, w, wtid);
  }
}

}  // namespace tokenspeed::mla_sm90::dev
