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

constexpr int kCombineThreads = 128;  // 4 warps, one row each
constexpr int kRowsPerBlock = kCombineThreads / 32;

// grid.x = batch * ceil(rows / 4), grid.y = combine_dsplit; a block handles four rows
// of one sequence and 512 / dsplit of their value dims.
__global__ void __launch_bounds__(kCombineThreads)
    mla_decode_sm90_combine_kernel(const __grid_constant__ MlaDecodeSm90Params p) {
  const int row_groups = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int b = blockIdx.x / row_groups;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = (blockIdx.x - b * row_groups) * kRowsPerBlock + warp;
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
  __shared__ int red[2][kRowsPerBlock];
  if (lane == 0) {
    red[0][warp] = before;
    red[1][warp] = all;
  }
  __syncthreads();
  int start = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kRowsPerBlock; ++w) {
    start += red[0][w];
    total += red[1][w];
  }
  if (r >= p.rows) return;

  const int tiles = seq_tiles(clamp_len(__ldg(p.seqlens + b), capacity));
  const int dims = kHeadDimV / p.combine_dsplit;  // 512 or 128
  const int nvec = dims / 128;                     // float4 per lane: 4 or 1
  const int d0 = blockIdx.y * dims + lane * 4;
  const int64_t row = static_cast<int64_t>(b) * p.rows + r;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV;
  const float ninf = __int_as_float(0xff800000);

  if (tiles == 0) {  // no keys at all: the decode kernel never visits this sequence
    for (int k = 0; k < nvec; ++k) {
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

  float mx = ninf;
  for (int s = s_lo; s <= s_hi; ++s) {
    mx = fmaxf(mx, p.ws_lse[static_cast<int64_t>(partial_index(s, start, per_slot)) * p.rows + r]);
  }
  const float shift = mx == ninf ? 0.f : mx;  // every split empty: all weights exp(-inf) = 0
  float sum = 0.f;
  float4 acc[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = s_lo; s <= s_hi; ++s) {
    const int64_t part = static_cast<int64_t>(partial_index(s, start, per_slot)) * p.rows + r;
    const float wgt = expf(p.ws_lse[part] - shift);
    sum += wgt;
    const float* src = p.ws_out + part * kHeadDimV + d0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < nvec) {
        const float4 v = *reinterpret_cast<const float4*>(src + 128 * k);
        acc[k].x += wgt * v.x;
        acc[k].y += wgt * v.y;
        acc[k].z += wgt * v.z;
        acc[k].w += wgt * v.w;
      }
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (k < nvec) {
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + d0 + 128 * k);
      dst[0] = __floats2bfloat162_rn(acc[k].x * inv, acc[k].y * inv);
      dst[1] = __floats2bfloat162_rn(acc[k].z * inv, acc[k].w * inv);
    }
  }
  if (blockIdx.y == 0 && lane == 0) p.lse[row] = sum > 0.f ? shift + logf(sum) : ninf;
}

}  // namespace

cudaError_t launch_mla_decode_sm90_combine(const MlaDecodeSm90Params& params, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  const int row_groups = (params.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid(static_cast<unsigned>(params.batch) * row_groups, params.combine_dsplit);
  mla_decode_sm90_combine_kernel<<<grid, kCombineThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace tokenspeed::mla_sm90
