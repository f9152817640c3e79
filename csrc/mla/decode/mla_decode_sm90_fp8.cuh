// The fp8-cache variant of the Hopper MLA decode (kernel variant 2); included by
// mla_decode_sm90_kernel.cuh after the helpers it shares with the bf16 schedules.
//
// The cache holds e4m3 codes with one per-tensor scale. wgmma cannot mix a bf16 Q with fp8 K,
// and fp8 wgmma wants both operands K-major (V is MN-major for PV), so the tiles are widened:
// an e4m3 code is exactly an f16 (one cvt.rn.f16x2.e4m3x2 per pair), and QK^T and PV run as f16
// wgmma on the bf16 kernel's stage layout, with its lockstep consumers (run_consumer). The scale
// is folded, never applied per element: scores use softmax_scale * kv_scale, the output is
// multiplied by kv_scale once (finish_segment).
//
// The producer warpgroup (128 threads) is the loader: it reads a whole tile of codes from global
// memory into registers (18 x 16 B per thread, through the block table), waits for the stage to
// be released, widens the codes into it (keys past the sequence are zeros: no NaN of an unused
// slot reaches a product), arrives on the stage's full barrier (one arrival per warp), and loads
// the next tile while the consumers work. Widening in registers keeps the two 72 KB f16 stages
// of the bf16 layout; an fp8 stage in shared memory as well would not fit beside them.
// Q is f16 too: bf16's range is wider, so each segment's Q is scaled by a power of two that
// puts its largest |q| in [2^13, 2^14), and the score scale takes the inverse.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/sm90_ptx.cuh"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_layout.cuh"
#include "mla/decode/mla_decode_sm90_schedule.cuh"
#include "mla/decode/mla_decode_sm90_trace.cuh"

namespace tokenspeed::mla_sm90::dev {

// Four e4m3 codes (bytes 0 .. 3 of w) -> two f16x2 (exact): lo holds codes 0, 1 and hi 2, 3.
// The halves are named as 16-bit registers so ptxas converts the upper one in place (F2FP with
// an .H1 operand) instead of shifting it down first (one SHF per pair saved).
__device__ __forceinline__ void e4m3x4_to_f16x4(uint32_t w, uint32_t& lo, uint32_t& hi) {
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
}

// Eight e4m3 codes (a 64-bit half of a vector) -> eight f16 (exact), as one 16-byte vector.
__device__ __forceinline__ uint4 e4m3x8_to_f16x8(uint32_t lo, uint32_t hi) {
  uint4 h;
  e4m3x4_to_f16x4(lo, h.x, h.y);
  e4m3x4_to_f16x4(hi, h.z, h.w);
  return h;
}

// A tile is 2304 vectors of 16 codes; producer thread tid (of its warpgroup) owns vectors
// c = tid + 128 j (j < 18). Vector c
// is (key k, dims 16 g ..): sub = c % 4, k = 2 (c / 72) + (c / 4) % 2, panel = (c / 8) % 9,
// g = 4 panel + sub. So 8 consecutive lanes write two rows (k, k + 1) of one 128-byte panel row
// pair whose swizzle phases differ: their 16-byte stores cover all 32 banks once.
constexpr int kF8Vecs = kBlockN * kHeadDim / 16 / 128;  // 18
struct F8Slot {
  int key, panel, sub;
};
__device__ __forceinline__ F8Slot f8_slot(int j) {
  // threadIdx.x read here, in a volatile asm, so the compiler recomputes the 18 slots per tile
  // (a few integer ops) instead of keeping them live across the loop in the producer's registers.
  uint32_t tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  const int c = static_cast<int>(tid & 127u) + 128 * j;
  const int rest = c >> 3;
  return {2 * (rest / 9) + ((c >> 2) & 1), rest % 9, c & 3};
}

// Where a tile's codes are: the cache row of each box (block-table reads) and its keys < len.
struct TileLoc {
  int cache_row[4];
  int valid;
};
__device__ __forceinline__ TileLoc locate_tile(const MlaDecodeSm90Params& p, const TileCursor& cur) {
  const int ps_log2 = p.page_size_log2;
  const int box_log2 = ps_log2 < 6 ? ps_log2 : 6;
  const int32_t* table = p.block_table + static_cast<int64_t>(cur.seg.b) * p.block_table_stride;
  const TileBoxes tb = tile_boxes(table, cur.t * kBlockN, cur.seg.len, ps_log2, box_log2);
  return {{tb.cache_row[0], tb.cache_row[1], tb.cache_row[2], tb.cache_row[3]},
          min(kBlockN, cur.seg.len - cur.t * kBlockN)};
}

// The codes of a located tile into registers; keys >= the sequence length read as zeros.
__device__ __forceinline__ void load_f8_tile(const MlaDecodeSm90Params& p, const TileLoc& loc,
                                             uint4 (&v)[kF8Vecs]) {
  const int box_log2 = p.page_size_log2 < 6 ? p.page_size_log2 : 6;
#pragma unroll
  for (int j = 0; j < kF8Vecs; ++j) {
    const F8Slot sl = f8_slot(j);
    v[j] = make_uint4(0u, 0u, 0u, 0u);
    if (sl.key < loc.valid) {
      const int x = sl.key >> box_log2;  // selects, not an indexed array: it would live in local memory
      const int first = x == 0 ? loc.cache_row[0] : x == 1 ? loc.cache_row[1] : x == 2 ? loc.cache_row[2] : loc.cache_row[3];
      const int64_t row = first + (sl.key & ((1 << box_log2) - 1));
      v[j] = __ldg(reinterpret_cast<const uint4*>(p.kv_codes + row * kHeadDim) + 4 * sl.panel + sl.sub);
    }
  }
}

// The registers, widened to f16, into a stage (the bf16 kernel's swizzled panel layout).
__device__ __forceinline__ void store_f16_tile(const uint4 (&v)[kF8Vecs], uint8_t* stage) {
#pragma unroll
  for (int j = 0; j < kF8Vecs; ++j) {
    const F8Slot sl = f8_slot(j);
    uint8_t* row = stage + sl.panel * kPanelBytes + sl.key * 128;
    const int x = sl.key & 7;
    *reinterpret_cast<uint4*>(row + (((2 * sl.sub) ^ x) << 4)) = e4m3x8_to_f16x8(v[j].x, v[j].y);
    *reinterpret_cast<uint4*>(row + (((2 * sl.sub + 1) ^ x) << 4)) = e4m3x8_to_f16x8(v[j].z, v[j].w);
  }
}

// The producer's walk over its tiles: the cursor at the next tile, and that tile's position in the
// CTA's tile order (iter & 1: its stage).
struct F8Feed {
  TileCursor cur;
  bool started;
  uint32_t next_iter;
};

// Loads the producer's next tile into v (its iter into it; has = false when none is left): the
// walk steps, then locates and loads. (Locating the tile after next before these loads, which
// helped the two-producer form this kernel once had at <= 32 rows, was slower here: 128 x 64 x 8K
// 527 vs 495 us, H100 2026-11-24.)
__device__ __forceinline__ void take_tile(const MlaDecodeSm90Params& p, const SlotRange& sr, F8Feed& f,
                                          uint4 (&v)[kF8Vecs], uint32_t& it, bool& has) {
  if (f.started && f.cur.live) f.cur.advance(p, sr);
  f.started = true;
  has = f.cur.live;
  if (!has) return;
  it = f.next_iter++;
  if constexpr (trace::kProbe != trace::kProbeConsumer) load_f8_tile(p, locate_tile(p, f.cur), v);
}

// Waits for the tile's stage, widens v into it, arrives on its full barrier (one per warp).
__device__ __forceinline__ void put_tile(uint8_t* smem, uint32_t smem_base, const uint4 (&v)[kF8Vecs], uint32_t it) {
  const int stage = it & 1;
  mbar_wait(smem_base + kBarOff + (kStages + stage) * 8, ((it >> 1) & 1) ^ 1);
  if constexpr (trace::kProbe == trace::kProbeLoadsOnly) {  // probe: wait for the codes, store nothing
    uint32_t x = 0;
#pragma unroll
    for (int j = 0; j < kF8Vecs; ++j) x ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    if (x == 0x9e3779b9u) smem[kStageOff + stage * kTileBytes] = 1;
  } else if constexpr (trace::kProbe != trace::kProbeConsumer) {
    store_f16_tile(v, smem + kStageOff + stage * kTileBytes);
  }
  fence_proxy_async();  // generic stores -> read by wgmma
  __syncwarp();
  if ((threadIdx.x & 31) == 0) mbar_arrive(smem_base + kBarOff + stage * 8);
}

// The producer warpgroup loads every tile: one tile of codes in flight in its registers while
// the consumers work on the other stage.
__device__ __forceinline__ void run_producer_fp8(const MlaDecodeSm90Params& p, const SlotRange& sr, uint8_t* smem,
                                                 uint32_t smem_base) {
  // Measured and not kept (H100, 2026-11-24): prefetching tiles into L2 two ahead
  // (prefetch.global.L2) made every row slower (128 x 16 x 4K: 247 -> 338 us).
  F8Feed f;
  f.cur.start(p, sr);
  f.started = false;
  f.next_iter = 0;
  uint4 v[kF8Vecs];
  uint32_t it = 0;
  bool has;
  take_tile(p, sr, f, v, it, has);
  while (has) {
    put_tile(smem, smem_base, v, it);
    take_tile(p, sr, f, v, it, has);
  }
}

// The power-of-two scale that makes Q f16 (see the header): the CTA's max |q| over the vectors v
// (bf16) of kWarps consumer warps, reduced through red[kWarps] (named barrier kBarSeg; the
// caller's barriers bracket it). Returns {2^e, 2^-e}: amax * 2^e lies in [2^13, 2^14).
template <int kWarps, int kVecs>
__device__ __forceinline__ float2 q_f16_scale(const uint4 (&v)[kVecs], int ctid, float* red) {
  __nv_bfloat162 mx2 = __float2bfloat162_rn(0.f);
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    const uint32_t words[4] = {v[k].x, v[k].y, v[k].z, v[k].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) mx2 = __hmax2(mx2, __habs2(*reinterpret_cast<const __nv_bfloat162*>(&words[i])));
  }
  float amax = fmaxf(__low2float(mx2), __high2float(mx2));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((ctid & 31) == 0) red[ctid >> 5] = amax;
  named_bar_sync(kBarSeg, 32 * kWarps);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) amax = fmaxf(amax, red[w]);
  // amax in [2^(E-127), 2^(E-126)) for its biased exponent E; e = 140 - E puts it in [2^13, 2^14).
  // E is clamped to [76, 254] so 2^e and 2^-e are normal floats (a zero or tiny Q gets 2^64).
  const int biased = min(max((__float_as_int(amax) >> 23) & 0xff, 76), 254);
  return make_float2(__int_as_float((267 - biased) << 23), __int_as_float((biased - 13) << 23));
}

// Two bf16 of Q times 2^e, as two f16.
__device__ __forceinline__ uint32_t bf16x2_to_f16x2_scaled(uint32_t word, float up) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&word));
  const __half2 h = __floats2half2_rn(f.x * up, f.y * up);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Q as f16 (rows of block mb, the bf16 kernel's panel layout): returns 2^-e for
// the score scale.
__device__ __forceinline__ float load_q_f16(const MlaDecodeSm90Params& p, int b, int mb, uint8_t* q_smem,
                                            int ctid, float* red) {
  uint4 v[kQVecs];
  load_q_vectors(p, b, mb, ctid, v);
  const float2 scale = q_f16_scale<kConsumerWarps>(v, ctid, red);
#pragma unroll
  for (int k = 0; k < kQVecs; ++k) {
    v[k] = make_uint4(bf16x2_to_f16x2_scaled(v[k].x, scale.x), bf16x2_to_f16x2_scaled(v[k].y, scale.x),
                      bf16x2_to_f16x2_scaled(v[k].z, scale.x), bf16x2_to_f16x2_scaled(v[k].w, scale.x));
  }
  store_q_vectors(q_smem, ctid, v);
  return scale.y;
}

}  // namespace tokenspeed::mla_sm90::dev
