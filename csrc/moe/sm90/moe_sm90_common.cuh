// Device helpers shared by the sm90 MoE kernels (moe_sm90_permute.cu, moe_sm90_decode*.cu):
// bf16 <-> fp32 packing, the streaming weight load, and the DeepSeek per-128 activation
// quantisation, and the decode GEMVs' grid (host).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "moe/moe_sm90.h"

namespace tokenspeed::moe_sm90 {

constexpr int kGroupLanes = kScaleBlock / 8;  // 16 lanes x 8 values = one 128-value scale group

struct Bf16x8 {
  float v[8];
};

__device__ __forceinline__ Bf16x8 unpack_bf16x8(uint4 raw) {
  Bf16x8 out;
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out.v[2 * i] = f.x;
    out.v[2 * i + 1] = f.y;
  }
  return out;
}

__device__ __forceinline__ uint4 pack_bf16x8(const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  return raw;
}

// Quantises this lane's 8 values of a 128-value group shared by 16 consecutive lanes:
// scale = max(amax, 1e-10) / 448, q = e4m3(clamp(x / scale)) with IEEE division and
// round-to-nearest-even, as the reference does. Every lane of the warp must call it.
__device__ __forceinline__ uint2 quantize_group_lane(const float (&v)[8], float& scale) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int d = kGroupLanes / 2; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  scale = __fdiv_rn(fmaxf(amax, 1e-10f), kE4m3Max);
  uint2 packed;
  auto* q = reinterpret_cast<__nv_fp8x2_storage_t*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 pair;
    pair.x = fminf(fmaxf(__fdiv_rn(v[2 * i], scale), -kE4m3Max), kE4m3Max);
    pair.y = fminf(fmaxf(__fdiv_rn(v[2 * i + 1], scale), -kE4m3Max), kE4m3Max);
    q[i] = __nv_cvt_float2_to_fp8x2(pair, __NV_SATFINITE, __NV_E4M3);
  }
  return packed;
}

// Quantises one row of kb 128-value groups with the whole block (blockDim.x a multiple of 16):
// load(i, v) fills the 8 fp32 values of the row's 16-byte vector i (group i / 16), dst[i]
// receives their e4m3 codes, and group g's scale goes to scales[scale_index(g)]. The trip
// count is the same for every thread: the shuffles need all lanes.
template <class Load, class ScaleIndex>
__device__ __forceinline__ void quantize_row(int kb, uint2* dst, float* scales, Load load, ScaleIndex scale_index) {
  const int groups_per_pass = blockDim.x / kGroupLanes;
  for (int g0 = 0; g0 < kb; g0 += groups_per_pass) {
    const int g = g0 + threadIdx.x / kGroupLanes;
    const int i = g * kGroupLanes + threadIdx.x % kGroupLanes;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (g < kb) load(i, v);
    float scale;
    const uint2 q = quantize_group_lane(v, scale);
    if (g < kb) {
      dst[i] = q;
      if (threadIdx.x % kGroupLanes == 0) scales[scale_index(g)] = scale;
    }
  }
}

// quantize_row's load for a bf16 row: vector i of src, as fp32.
struct Bf16RowLoad {
  const uint4* src;
  __device__ __forceinline__ void operator()(int i, float (&v)[8]) const {
    const Bf16x8 in = unpack_bf16x8(src[i]);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = in.v[j];
  }
};

// Grid of a decode-path GEMV: blocks_x column blocks times one block row per task, the rows
// capped so that a launch stays within kDecodeMaxBlocks CTAs (enough waves to fill the GPU,
// few idle ones; each CTA loops over its tasks).
constexpr int kDecodeMaxBlocks = 8192;
inline dim3 decode_grid(int blocks_x, int max_tasks) {
  int blocks_y = max_tasks < 1 ? 1 : max_tasks;
  if (static_cast<int64_t>(blocks_x) * blocks_y > kDecodeMaxBlocks) blocks_y = max(1, kDecodeMaxBlocks / blocks_x);
  return dim3(blocks_x, blocks_y);
}

// 16 bytes of weights read once: no L1 allocation, 256-byte L2 prefetch.
__device__ __forceinline__ uint4 load_stream16(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

}  // namespace tokenspeed::moe_sm90
