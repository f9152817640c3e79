// Combine kernel of the sm90 MLA decode: merges the partial results of sequences
// whose keys were split over several CTAs, by their LSE, and writes the rows of empty
// sequences (out 0, lse -inf). It recomputes the device-side plan of
// mla_decode_sm90.h from cache_seqlens, so which sequences were split is known
// without any host round trip. Light: no wgmma / TMA.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "mla/decode/mla_decode_sm90.h"

namespace tokenspeed::mla_sm90 {
namespace {

constexpr int kCombineThreads = 128;  // 4 warps
constexpr int kCombineWarps = kCombineThreads / 32;

// Two shapes of the same merge, picked by the launcher from how much there is to merge:
//  * NVEC 4, WPR 1 (many rows): a block handles 4 rows of one sequence, a warp per row,
//    each lane 16 of the 512 value dims;
//  * NVEC 1, WPR 4 (few rows, e.g. batch 1 split over all SMs): a block handles 128 value
//    dims of one row and its 4 warps take every 4th split, then add up through smem.
// In both, the splits' loads are issued kUnroll at a time: the merge is latency-bound
// (batch 1 / 64K keys has 129 splits per row), a loop that waits for each load in turn
// cost 29 us on the H100 where the bytes need about 2.
// grid.x = batch * ceil(rows / (4 / WPR)), grid.y = 512 / (128 * NVEC).
template <int NVEC, int WPR>
__global__ void __launch_bounds__(kCombineThreads)
    mla_decode_sm90_combine_kernel(const __grid_constant__ MlaDecodeSm90Params p) {
  constexpr int kRowsPerBlock = kCombineWarps / WPR;
  constexpr int kUnroll = NVEC == 4 ? 4 : 8;
  const int row_groups = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int b = blockIdx.x / row_groups;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = (blockIdx.x - b * row_groups) * kRowsPerBlock + warp / WPR;
  const int phase = warp % WPR;  // this warp takes splits s_lo + phase, + WPR, ...
  const int capacity = p.max_pages << p.page_size_log2;

  // P_b (costs of the sequences before b) and T (all costs), as the decode kernel sees them.
  int before = 0, all = 0;
  for (int x = threadIdx.x; x < p.batch; x += kCombineThreads) {
    const int c = seq_cost(seq_tiles(clamp_len(__ldg(p.seqlens + x), capacity)));
    all += c;
    before += x < b ? c : 0;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    all += __shfl_xor_sync(0xffffffffu, all, o);
    before += __shfl_xor_sync(0xffffffffu, before, o);
  }
  __shared__ int red[2][kCombineWarps];
  if (lane == 0) {
    red[0][warp] = before;
    red[1][warp] = all;
  }
  __syncthreads();
  int start = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) {
    start += red[0][w];
    total += red[1][w];
  }
  // The plan above only read cache_seqlens; the partials below are the decode kernel's
  // output. Launched with programmatic serialization, this waits for that grid to finish.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // From here on every exit is uniform over the block when WPR > 1 (one row per block).
  if (r >= p.rows) return;

  const int tiles = seq_tiles(clamp_len(__ldg(p.seqlens + b), capacity));
  const int d0 = blockIdx.y * (128 * NVEC) + lane * 4;
  const int64_t row = static_cast<int64_t>(b) * p.rows + r;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV;
  const float ninf = __int_as_float(0xff800000);

  if (tiles == 0) {  // no keys at all: the decode kernel never visits this sequence
    if (phase != 0) return;
#pragma unroll
    for (int k = 0; k < NVEC; ++k) {
      const __nv_bfloat162 z = __floats2bfloat162_rn(0.f, 0.f);
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + d0 + 128 * k);
      dst[0] = z;
      dst[1] = z;
    }
    if (blockIdx.y == 0 && lane == 0) p.lse[row] = ninf;
    return;
  }
  const int per_slot = cost_per_slot(total, p.slots);
  const int first = start + kSegmentOverhead;  // plan position of tile 0
  const int s_lo = first / per_slot;
  const int s_hi = (first + tiles - 1) / per_slot;
  if (s_lo == s_hi) return;  // one CTA had it all and wrote out / lse itself

  const float* ws_lse = p.ws_lse + r;
  // Max over the splits' lse: the lanes read different splits at once.
  float mx = ninf;
  for (int s = s_lo + lane; s <= s_hi; s += 32) {
    mx = fmaxf(mx, ws_lse[static_cast<int64_t>(partial_index(s, start, per_slot)) * p.rows]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float shift = mx == ninf ? 0.f : mx;  // every split empty: all weights exp(-inf) = 0

  float sum = 0.f;
  float4 acc[NVEC];
#pragma unroll
  for (int k = 0; k < NVEC; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  auto add = [&](float l, const float4 (&v)[NVEC]) {
    const float wgt = expf(l - shift);
    sum += wgt;
#pragma unroll
    for (int k = 0; k < NVEC; ++k) {
      acc[k].x += wgt * v[k].x;
      acc[k].y += wgt * v[k].y;
      acc[k].z += wgt * v[k].z;
      acc[k].w += wgt * v[k].w;
    }
  };
  auto load = [&](int s, float& l, float4 (&v)[NVEC]) {
    const int64_t part = static_cast<int64_t>(partial_index(s, start, per_slot)) * p.rows + r;
    l = p.ws_lse[part];
    const float* src = p.ws_out + part * kHeadDimV + d0;
#pragma unroll
    for (int k = 0; k < NVEC; ++k) v[k] = *reinterpret_cast<const float4*>(src + 128 * k);
  };
  int s = s_lo + phase;
  for (; s + (kUnroll - 1) * WPR <= s_hi; s += kUnroll * WPR) {
    float l[kUnroll];
    float4 v[kUnroll][NVEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load(s + u * WPR, l[u], v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) add(l[u], v[u]);
  }
  for (; s <= s_hi; s += WPR) {
    float l;
    float4 v[NVEC];
    load(s, l, v);
    add(l, v);
  }
  if constexpr (WPR > 1) {  // the block's warps hold disjoint splits of the same row
    static_assert(NVEC == 1, "the cross-warp merge holds one float4 per lane");
    __shared__ float4 red_acc[WPR][32];
    __shared__ float red_sum[WPR];
    red_acc[phase][lane] = acc[0];
    if (lane == 0) red_sum[phase] = sum;
    __syncthreads();
    if (phase != 0) return;
#pragma unroll
    for (int w = 1; w < WPR; ++w) {
      const float4 a = red_acc[w][lane];
      acc[0].x += a.x;
      acc[0].y += a.y;
      acc[0].z += a.z;
      acc[0].w += a.w;
      sum += red_sum[w];
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int k = 0; k < NVEC; ++k) {
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + d0 + 128 * k);
    dst[0] = __floats2bfloat162_rn(acc[k].x * inv, acc[k].y * inv);
    dst[1] = __floats2bfloat162_rn(acc[k].z * inv, acc[k].w * inv);
  }
  if (blockIdx.y == 0 && lane == 0) p.lse[row] = sum > 0.f ? shift + logf(sum) : ninf;
}

}  // namespace

// Launched with programmatic stream serialization: its blocks may start (and compute the
// plan) while the decode kernel's last CTAs finish, hiding a launch latency at batch 1.
cudaError_t launch_mla_decode_sm90_combine(const MlaDecodeSm90Params& params, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.blockDim = dim3(kCombineThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (params.combine_dsplit == 1) {  // many rows: a warp per row, all 512 dims
    const unsigned groups = static_cast<unsigned>((params.rows + kCombineWarps - 1) / kCombineWarps);
    cfg.gridDim = dim3(static_cast<unsigned>(params.batch) * groups, 1);
    return cudaLaunchKernelEx(&cfg, mla_decode_sm90_combine_kernel<4, 1>, params);
  }
  // few rows: a block per (row, 128 dims), the splits shared by its warps
  cfg.gridDim = dim3(static_cast<unsigned>(params.batch) * params.rows, 4);
  return cudaLaunchKernelEx(&cfg, mla_decode_sm90_combine_kernel<1, kCombineWarps>, params);
}

}  // namespace tokenspeed::mla_sm90
