// Combine kernel of the sm90 MLA decode: merges the partial results of sequences
// whose keys were split over several CTAs, by their LSE, and writes the rows of empty
// sequences (out 0, lse -inf). It recomputes the sequences' plan starts of mla_decode_sm90.h
// from cache_seqlens and reads the per-slot capacity the decode kernel chose (ws_plan), so
// which sequences were split is known without any host round trip. Light: no wgmma / TMA.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_trace.cuh"

namespace tokenspeed::mla_sm90 {
namespace {

// Where sequence b's plan range starts (P_b), as the decode kernel computes it;
// kThreadsPerBlock threads of the block cooperate.
template <int kThreadsPerBlock>
__device__ __forceinline__ int plan_start(const MlaDecodeSm90Params& p, int b, int capacity) {
  constexpr int kWarps = kThreadsPerBlock / 32;
  __shared__ int red[kWarps];
  int before = 0;
  for (int x = threadIdx.x; x < b; x += kThreadsPerBlock) {
    before += seq_cost(seq_tiles(clamp_len(__ldg(p.seqlens + x), capacity)));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) before += __shfl_xor_sync(0xffffffffu, before, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = before;
  __syncthreads();
  int start = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) start += red[w];
  return start;
}

// The slots [s_lo, s_hi] that hold sequence b's tiles (tiles > 0). The per-slot capacity is
// the one the decode kernel chose (ws_plan): read only after griddepcontrol.wait.
struct SplitRange {
  int s_lo, s_hi, start, per_slot;
};
__device__ __forceinline__ SplitRange split_range(const MlaDecodeSm90Params& p, int start, int tiles) {
  const int per_slot = *p.ws_plan;
  const SlotSpan s = slot_span(start, tiles, per_slot);
  return {s.lo, s.hi, start, per_slot};
}

__device__ __forceinline__ void write_empty_row(const MlaDecodeSm90Params& p, int64_t row, int d0,
                                                int nvec, bool write_lse) {
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV;
  const __nv_bfloat162 z = __floats2bfloat162_rn(0.f, 0.f);
  for (int k = 0; k < nvec; ++k) {
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + d0 + 128 * k);
    dst[0] = z;
    dst[1] = z;
  }
  if (write_lse) p.lse[row] = __int_as_float(0xff800000);
}

__device__ __forceinline__ void fma4(float4& acc, float w, const float4& v) {
  acc.x += w * v.x;
  acc.y += w * v.y;
  acc.z += w * v.z;
  acc.w += w * v.w;
}

__device__ __forceinline__ void store4_bf16(__nv_bfloat16* dst, const float4& a, float inv) {
  __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst);
  d[0] = __floats2bfloat162_rn(a.x * inv, a.y * inv);
  d[1] = __floats2bfloat162_rn(a.z * inv, a.w * inv);
}

// ---- Many rows to merge: a warp per row, each lane 16 of the 512 value dims. ----
// grid.x = batch * ceil(rows / 4). The merge is latency-bound: the splits' lse are read
// by the lanes at once and their values kUnroll splits at a time.
constexpr int kRowsThreads = 128;
__global__ void __launch_bounds__(kRowsThreads)
    mla_decode_sm90_combine_rows_kernel(const __grid_constant__ MlaDecodeSm90Params p) {
  constexpr int kUnroll = 4;
  const int row_groups = (p.rows + 3) / 4;
  const int b = blockIdx.x / row_groups;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = (blockIdx.x - b * row_groups) * 4 + warp;
  const int capacity = p.max_pages << p.page_size_log2;
  const int start = plan_start<kRowsThreads>(p, b, capacity);
  // The plan above only read cache_seqlens; the partials and C (ws_plan) are the decode
  // kernel's output. Launched with programmatic serialization, this waits for that grid to finish.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  TS_MLA_TRACE_EVENT("combine_rows", trace::kCombineWaited);
  if (r >= p.rows) return;
  const int tiles = seq_tiles(clamp_len(__ldg(p.seqlens + b), capacity));
  const int64_t row = static_cast<int64_t>(b) * p.rows + r;
  const int d0 = lane * 4;
  if (tiles == 0) {  // no keys at all: the decode kernel never visits this sequence
    write_empty_row(p, row, d0, 4, lane == 0);
    return;
  }
  const SplitRange sp = split_range(p, start, tiles);
  if (sp.s_lo == sp.s_hi) return;  // one CTA had it all and wrote out / lse itself

  const float ninf = __int_as_float(0xff800000);
  float mx = ninf;
  for (int s = sp.s_lo + lane; s <= sp.s_hi; s += 32) {
    mx = fmaxf(mx, p.ws_lse[static_cast<int64_t>(partial_index(s, sp.start, sp.per_slot)) * p.rows + r]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float shift = mx == ninf ? 0.f : mx;  // every split empty: all weights exp(-inf) = 0

  float sum = 0.f;
  float4 acc[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = sp.s_lo; s0 <= sp.s_hi; s0 += kUnroll) {
    float l[kUnroll];
    float4 v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = min(s0 + u, sp.s_hi);  // past the end: a harmless reload, weight 0 below
      const int64_t part = static_cast<int64_t>(partial_index(s, sp.start, sp.per_slot)) * p.rows + r;
      l[u] = p.ws_lse[part];
      const float* src = p.ws_out + part * kHeadDimV + d0;
#pragma unroll
      for (int k = 0; k < 4; ++k) v[u][k] = *reinterpret_cast<const float4*>(src + 128 * k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float w = s0 + u <= sp.s_hi ? expf(l[u] - shift) : 0.f;
      sum += w;
#pragma unroll
      for (int k = 0; k < 4; ++k) fma4(acc[k], w, v[u][k]);
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV;
#pragma unroll
  for (int k = 0; k < 4; ++k) store4_bf16(out + d0 + 128 * k, acc[k], inv);
  if (lane == 0) p.lse[row] = sum > 0.f ? shift + logf(sum) : ninf;
  TS_MLA_TRACE_EVENT("combine_rows", trace::kCombineDone);
}

// ---- Few rows, many splits (batch 1 split over every SM): a block per (row, 128 dims). ----
// grid = (batch * rows, 4). The block reads all the row's split lse at once into smem,
// turns them into weights, and its 8 warps take every 8th split with kUnroll loads in
// flight each: 129 splits cost two rounds of loads instead of 129.
constexpr int kSplitsThreads = 256;
constexpr int kSplitsWarps = kSplitsThreads / 32;
constexpr int kMaxSplits = 1024;  // >= slots; the launcher uses the rows kernel beyond
__global__ void __launch_bounds__(kSplitsThreads)
    mla_decode_sm90_combine_splits_kernel(const __grid_constant__ MlaDecodeSm90Params p) {
  constexpr int kUnroll = 8;
  __shared__ float wgt[kMaxSplits];
  __shared__ float red[kSplitsWarps];
  __shared__ float4 part_acc[kSplitsWarps][32];
  const int b = blockIdx.x / p.rows;
  const int r = blockIdx.x - b * p.rows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int capacity = p.max_pages << p.page_size_log2;
  const int start = plan_start<kSplitsThreads>(p, b, capacity);
  asm volatile("griddepcontrol.wait;" ::: "memory");  // see the rows kernel
  TS_MLA_TRACE_EVENT("combine_splits", trace::kCombineWaited);
  const int tiles = seq_tiles(clamp_len(__ldg(p.seqlens + b), capacity));
  const int64_t row = static_cast<int64_t>(b) * p.rows + r;
  const int d0 = blockIdx.y * 128 + lane * 4;
  if (tiles == 0) {
    if (warp == 0) write_empty_row(p, row, d0, 1, blockIdx.y == 0 && lane == 0);
    return;
  }
  const SplitRange sp = split_range(p, start, tiles);
  if (sp.s_lo == sp.s_hi) return;
  const int n = sp.s_hi - sp.s_lo + 1;

  // lse of every split -> smem, block max.
  const float ninf = __int_as_float(0xff800000);
  float mx = ninf;
  for (int i = threadIdx.x; i < n; i += kSplitsThreads) {
    const float l = p.ws_lse[static_cast<int64_t>(partial_index(sp.s_lo + i, sp.start, sp.per_slot)) * p.rows + r];
    wgt[i] = l;
    mx = fmaxf(mx, l);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
#pragma unroll
  for (int w = 1; w < kSplitsWarps; ++w) mx = fmaxf(mx, red[w]);
  const float shift = mx == ninf ? 0.f : mx;
  // Weights; each thread also sums the ones it wrote (block sum below).
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += kSplitsThreads) {
    const float w = expf(wgt[i] - shift);
    wgt[i] = w;
    sum += w;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  __syncthreads();  // weights visible; red[] free again
  if (lane == 0) red[warp] = sum;

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int i0 = warp; i0 < n; i0 += kUnroll * kSplitsWarps) {
    float4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = min(i0 + u * kSplitsWarps, n - 1);
      const int64_t part = static_cast<int64_t>(partial_index(sp.s_lo + i, sp.start, sp.per_slot)) * p.rows + r;
      v[u] = *reinterpret_cast<const float4*>(p.ws_out + part * kHeadDimV + d0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * kSplitsWarps;
      if (i < n) fma4(acc, wgt[i], v[u]);
    }
  }
  part_acc[warp][lane] = acc;
  __syncthreads();
  if (warp != 0) return;
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kSplitsWarps; ++w) sum += red[w];
#pragma unroll
  for (int w = 1; w < kSplitsWarps; ++w) {
    const float4 a = part_acc[w][lane];
    acc.x += a.x;
    acc.y += a.y;
    acc.z += a.z;
    acc.w += a.w;
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  store4_bf16(static_cast<__nv_bfloat16*>(p.out) + row * kHeadDimV + d0, acc, inv);
  if (blockIdx.y == 0 && lane == 0) p.lse[row] = sum > 0.f ? shift + logf(sum) : ninf;
  TS_MLA_TRACE_EVENT("combine_splits", trace::kCombineDone);
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
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (params.combine_dsplit == 1 || params.slots > kMaxSplits) {
    cfg.blockDim = dim3(kRowsThreads);
    cfg.gridDim = dim3(static_cast<unsigned>(params.batch) * static_cast<unsigned>((params.rows + 3) / 4));
    return cudaLaunchKernelEx(&cfg, mla_decode_sm90_combine_rows_kernel, params);
  }
  cfg.blockDim = dim3(kSplitsThreads);
  cfg.gridDim = dim3(static_cast<unsigned>(params.batch) * static_cast<unsigned>(params.rows), 4);
  return cudaLaunchKernelEx(&cfg, mla_decode_sm90_combine_splits_kernel, params);
}

}  // namespace tokenspeed::mla_sm90
