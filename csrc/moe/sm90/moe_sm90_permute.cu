// The small kernels around the two grouped GEMMs of the sm90 fused MoE: routing map
// (sort slots by local expert), row gather (+ fp8 quantisation), SiLU-and-mul (+ fp8
// quantisation), weighted combine, and two helpers of the standalone grouped GEMM.
//
// Every grid is sized from shapes only and every count is read on the device, so the
// whole pipeline can be captured in a CUDA graph. Nothing uses atomics whose order could
// change a result: the row order is a stable sort by expert (token order within an
// expert), and the combine sums a token's slots in slot order, so replays are bitwise equal.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "moe/moe_sm90.h"
#include "moe/sm90/moe_sm90_common.cuh"

namespace tokenspeed::moe_sm90 {
namespace {

constexpr int kThreads = 256;

// Local expert of a global id, or -1 (another rank's expert, or an id out of range).
__device__ __forceinline__ int local_expert(int32_t id, int expert_offset, int experts) {
  const int64_t e = static_cast<int64_t>(id) - expert_offset;
  return (e >= 0 && e < experts) ? static_cast<int>(e) : -1;
}

// ---------------------------------------------------------------------------------- routing map

// Per-chunk histogram of local experts (shared-memory atomics: counts do not depend on order).
__global__ void __launch_bounds__(kThreads) count_chunks_kernel(RouteMapParams p) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < p.experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int begin = blockIdx.x * kMapChunk;
  const int end = min(begin + kMapChunk, p.slots);
  for (int s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int e = local_expert(p.topk_ids[s], p.expert_offset, p.experts);
    if (e >= 0) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  int32_t* out = p.chunk_counts + static_cast<int64_t>(blockIdx.x) * p.experts;
  for (int e = threadIdx.x; e < p.experts; e += blockDim.x) out[e] = hist[e];
}

__device__ __forceinline__ int32_t warp_inclusive_sum(int32_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int32_t up = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += up;
  }
  return v;
}

// Inclusive prefix sum over the block of one value per thread, plus `carry` (the total of
// the block's earlier passes). Every thread of the block calls it; it starts with a barrier,
// so the caller's previous pass has finished reading `carry` and `warp_sums`.
__device__ __forceinline__ int32_t block_inclusive_sum(int32_t v, int32_t* warp_sums, const int32_t& carry) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  const int32_t in_warp = warp_inclusive_sum(v);
  if (lane == 31) warp_sums[warp] = in_warp;
  __syncthreads();
  if (warp == 0) warp_sums[lane] = warp_inclusive_sum(lane < (blockDim.x >> 5) ? warp_sums[lane] : 0);
  __syncthreads();
  return carry + in_warp + (warp > 0 ? warp_sums[warp - 1] : 0);
}

// Experts' starts and ends (exclusive / inclusive prefix over experts) from their row
// counts, by one block of 1024 threads; with `next_row` (shared memory) each expert's
// start is also left there for the ranking.
__device__ void scan_expert_counts(const RouteMapParams& p, const int32_t* counts, int32_t* next_row) {
  __shared__ int32_t warp_sums[32];
  __shared__ int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  for (int base = 0; base < p.experts; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int32_t v = e < p.experts ? counts[e] : 0;
    const int32_t inclusive = block_inclusive_sum(v, warp_sums, carry);
    if (e < p.experts) {
      p.expert_counts[e] = v;
      p.expert_end[e] = inclusive;
      p.expert_start[e] = inclusive - v;
      if (next_row != nullptr) next_row[e] = inclusive - v;
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = inclusive;
  }
  __syncthreads();
}

// The decode path's task list: each expert's rows in chunks of kDecodeRows, in expert order
// (one block, after scan_expert_counts wrote the counts and starts).
__device__ void write_decode_tasks(const RouteMapParams& p) {
  __shared__ int32_t warp_sums[32];
  __shared__ int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  for (int base = 0; base < p.experts; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int32_t count = e < p.experts ? p.expert_counts[e] : 0;
    const int32_t n = (count + kDecodeRows - 1) / kDecodeRows;
    const int32_t inclusive = block_inclusive_sum(n, warp_sums, carry);
    for (int c = 0; c < n; ++c) {
      const int32_t first = c * kDecodeRows;
      p.decode_tasks[inclusive - n + c] = DecodeTask{e, p.expert_start[e] + first, min(kDecodeRows, count - first), 0};
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = inclusive;
  }
  __syncthreads();
  if (threadIdx.x == 0) *p.num_decode_tasks = carry;
}

// One block of 1024 threads: per expert, each chunk's first rank within the expert
// (exclusive prefix over chunks, in place) and the expert's count; then the experts'
// starts and ends.
__global__ void __launch_bounds__(1024) scan_experts_kernel(RouteMapParams p) {
  for (int e = threadIdx.x; e < p.experts; e += blockDim.x) {
    int32_t run = 0;
    for (int c = 0; c < p.chunks; ++c) {
      int32_t* cell = p.chunk_counts + static_cast<int64_t>(c) * p.experts + e;
      const int32_t v = *cell;
      *cell = run;
      run += v;
    }
    p.expert_counts[e] = run;
  }
  __syncthreads();
  scan_expert_counts(p, p.expert_counts, nullptr);
  if (p.decode_tasks != nullptr) write_decode_tasks(p);
}

// Slots [begin, end) in order by one warp: peers with the same expert in a 32-slot step get
// consecutive rows (lane order), so the rows of an expert follow slot order. `next_row`
// (shared memory) holds each expert's next free row and advances.
__device__ __forceinline__ void rank_slots(const RouteMapParams& p, int begin, int end, int32_t* next_row) {
  const int lane = threadIdx.x & 31;
  for (int s0 = begin; s0 < end; s0 += 32) {
    const int s = s0 + lane;
    const int e = s < end ? local_expert(p.topk_ids[s], p.expert_offset, p.experts) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const int32_t row = e >= 0 ? next_row[e] + rank : -1;
    __syncwarp();
    if (e >= 0 && rank == 0) next_row[e] += __popc(peers);
    __syncwarp();
    if (s < end) {
      p.slot_row[s] = row;
      if (row >= 0) p.row_slot[row] = s;
    }
  }
}

// One warp per chunk.
__global__ void __launch_bounds__(32) rank_slots_kernel(RouteMapParams p) {
  extern __shared__ int32_t next_row[];
  const int32_t* base_of_chunk = p.chunk_counts + static_cast<int64_t>(blockIdx.x) * p.experts;
  for (int e = threadIdx.x; e < p.experts; e += 32) next_row[e] = p.expert_start[e] + base_of_chunk[e];
  __syncwarp();
  const int begin = blockIdx.x * kMapChunk;
  rank_slots(p, begin, min(begin + kMapChunk, p.slots), next_row);
}

// The whole map in one block when the slots fit one chunk (decode-sized batches): count,
// scan and rank without the two launches and global round trips of the chunked path.
// Same result: counts do not depend on order, and the ranking is the same warp walk.
__global__ void __launch_bounds__(1024) route_map_one_chunk_kernel(RouteMapParams p) {
  extern __shared__ int32_t smem[];  // [experts] counts, then [experts] next rows
  int32_t* counts = smem;
  int32_t* next_row = smem + p.experts;
  for (int e = threadIdx.x; e < p.experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < p.slots; s += blockDim.x) {
    const int e = local_expert(p.topk_ids[s], p.expert_offset, p.experts);
    if (e >= 0) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  scan_expert_counts(p, counts, next_row);
  if (p.decode_tasks != nullptr) write_decode_tasks(p);
  if (threadIdx.x < 32) rank_slots(p, 0, p.slots, next_row);
}

// Where row `row`'s scale of group `g` lives in the grouped GEMM's per-expert layout.
__device__ __forceinline__ int64_t group_scale_index(int row, int g, int kb, int start, int count) {
  return static_cast<int64_t>(start) * kb + static_cast<int64_t>(g) * count + (row - start);
}

// ------------------------------------------------------------------------------ gather

template <bool kFp8>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(GatherParams p) {
  const int row = blockIdx.x;
  const RowMap m = p.rows;
  if (row >= m.expert_end[m.experts - 1]) return;  // past the routed rows
  const int slot = m.row_slot[row];
  const auto* src = reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.x) +
                                                   static_cast<int64_t>(slot / p.top_k) * p.x_stride);
  const int vecs = p.hidden / 8;
  if constexpr (!kFp8) {
    auto* dst = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + static_cast<int64_t>(row) * p.hidden);
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) dst[i] = src[i];
  } else {
    const int e = local_expert(m.topk_ids[slot], m.expert_offset, m.experts);
    const int start = m.expert_start[e], count = m.expert_counts[e];
    const int kb = p.hidden / kScaleBlock;
    auto* dst = reinterpret_cast<uint2*>(static_cast<uint8_t*>(p.out) + static_cast<int64_t>(row) * p.hidden);
    quantize_row(kb, dst, p.out_scale, Bf16RowLoad{src},
                 [&](int g) { return group_scale_index(row, g, kb, start, count); });
  }
}

// ------------------------------------------------------------------------- SiLU-and-mul

// 8 consecutive fp32 values (two 16-byte loads).
__device__ __forceinline__ void load_f32x8(const float* src, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

// silu(g) * u in fp32 for the 8 values at vector index i (x / (1 + exp(-x)), IEEE division).
__device__ __forceinline__ void silu_mul8(const float* gate, const float* up, int i, float (&out)[8]) {
  float g[8], u[8];
  load_f32x8(gate + 8 * i, g);
  load_f32x8(up + 8 * i, u);
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = __fdiv_rn(g[j], 1.0f + expf(-g[j])) * u[j];
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(SiluMulParams p) {
  const int row = blockIdx.x;
  const RowMap m = p.rows;
  if (row >= m.expert_end[m.experts - 1]) return;
  const float* gate = p.gate_up + static_cast<int64_t>(row) * 2 * p.inter;
  const float* up = gate + p.inter;
  const int vecs = p.inter / 8;
  if constexpr (!kFp8) {
    auto* dst = reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + static_cast<int64_t>(row) * p.inter);
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
      float act[8];
      silu_mul8(gate, up, i, act);
      dst[i] = pack_bf16x8(act);
    }
  } else {
    const int e = local_expert(m.topk_ids[m.row_slot[row]], m.expert_offset, m.experts);
    const int start = m.expert_start[e], count = m.expert_counts[e];
    const int kb = p.inter / kScaleBlock;
    auto* dst = reinterpret_cast<uint2*>(static_cast<uint8_t*>(p.out) + static_cast<int64_t>(row) * p.inter);
    quantize_row(
        kb, dst, p.out_scale,
        [&](int i, float(&v)[8]) {
          float act[8];
          silu_mul8(gate, up, i, act);
          // The contract stores the intermediate in bf16; quantise those bf16 values.
          const Bf16x8 rounded = unpack_bf16x8(pack_bf16x8(act));
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = rounded.v[j];
        },
        [&](int g) { return group_scale_index(row, g, kb, start, count); });
  }
}

// ------------------------------------------------------------------------------ combine

constexpr int kCombineThreads = 128;

__device__ __forceinline__ void load8(const __nv_bfloat16* src, float (&v)[8]) {
  const Bf16x8 y = unpack_bf16x8(*reinterpret_cast<const uint4*>(src));
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = y.v[k];
}

__device__ __forceinline__ void load8(const float* src, float (&v)[8]) { load_f32x8(src, v); }

template <class TDown>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(CombineParams p) {
  const int t = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;  // 8-value vector of the hidden dim
  if (i >= p.hidden / 8) return;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; j < p.top_k; ++j) {  // slot order, fp32
    const int64_t slot = static_cast<int64_t>(t) * p.top_k + j;
    const int32_t row = p.slot_row[slot];
    if (row < 0) continue;  // another rank's expert
    const float w = p.topk_weights[slot];
    float y[8];
    load8(static_cast<const TDown*>(p.down) + static_cast<int64_t>(row) * p.hidden + 8 * i, y);
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[k] = fmaf(w, y[k], acc[k]);
  }
  reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + static_cast<int64_t>(t) * p.hidden)[i] =
      pack_bf16x8(acc);
}

// ------------------------------------------------------------- standalone grouped GEMM helpers

// Block-wide max of offsets[0 .. upto) (the clamped, monotone group end the GEMM uses).
__device__ int32_t block_max_prefix(const int32_t* offsets, int upto) {
  __shared__ int32_t partial[32];
  int32_t m = 0;
  for (int g = threadIdx.x; g < upto; g += blockDim.x) m = max(m, offsets[g]);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, d));
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, d));
    if (threadIdx.x == 0) partial[0] = m;
  }
  __syncthreads();
  const int32_t result = partial[0];
  __syncthreads();
  return result;
}

// One block per group: copies the group's [m_g, kb] row-major scales into its [kb, m_g] block.
__global__ void __launch_bounds__(kThreads) row_scales_to_group_layout_kernel(GroupScaleParams p) {
  const int g = blockIdx.x;
  const int64_t start = min(static_cast<int64_t>(block_max_prefix(p.offsets, g)), p.rows);
  const int64_t end = max(start, min(static_cast<int64_t>(block_max_prefix(p.offsets, g + 1)), p.rows));
  const int64_t count = end - start;
  for (int64_t idx = threadIdx.x; idx < count * p.kb; idx += blockDim.x) {
    const int64_t r = idx / p.kb, c = idx % p.kb;
    p.group_scale[start * p.kb + c * count + r] = p.row_scale[(start + r) * p.kb + c];
  }
}

constexpr int kTailRowsPerBlock = 8;

__global__ void __launch_bounds__(kThreads) zero_tail_rows_kernel(void* d, int64_t rows, int64_t row_bytes,
                                                                  const int32_t* offsets, int groups) {
  const int64_t end = min(static_cast<int64_t>(block_max_prefix(offsets, groups)), rows);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTailRowsPerBlock;
  const int64_t last = min(first + kTailRowsPerBlock, rows);
  const int64_t vecs = row_bytes / 16;
  for (int64_t r = max(first, end); r < last; ++r) {
    auto* row = reinterpret_cast<uint4*>(static_cast<char*>(d) + r * row_bytes);
    for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) row[i] = make_uint4(0, 0, 0, 0);
  }
}

}  // namespace

cudaError_t launch_route_map(const RouteMapParams& p, cudaStream_t stream) {
  const size_t hist_bytes = static_cast<size_t>(p.experts) * sizeof(int32_t);
  if (p.chunks == 1) {
    route_map_one_chunk_kernel<<<1, 1024, 2 * hist_bytes, stream>>>(p);
    return cudaGetLastError();
  }
  count_chunks_kernel<<<p.chunks, kThreads, hist_bytes, stream>>>(p);
  scan_experts_kernel<<<1, 1024, 0, stream>>>(p);
  rank_slots_kernel<<<p.chunks, 32, hist_bytes, stream>>>(p);
  return cudaGetLastError();
}

// One block per row of the map; rows past the routed ones return at once.
template <typename Params>
cudaError_t launch_per_row(void (*fp8_kernel)(Params), void (*bf16_kernel)(Params), const Params& p, bool fp8,
                           cudaStream_t stream) {
  (fp8 ? fp8_kernel : bf16_kernel)<<<p.rows.max_rows, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_gather_rows(const GatherParams& p, bool fp8, cudaStream_t stream) {
  return launch_per_row(gather_rows_kernel<true>, gather_rows_kernel<false>, p, fp8, stream);
}

cudaError_t launch_silu_mul(const SiluMulParams& p, bool fp8, cudaStream_t stream) {
  return launch_per_row(silu_mul_kernel<true>, silu_mul_kernel<false>, p, fp8, stream);
}

cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream) {
  const dim3 grid(p.tokens, (p.hidden / 8 + kCombineThreads - 1) / kCombineThreads);
  if (p.down_f32) {
    combine_kernel<float><<<grid, kCombineThreads, 0, stream>>>(p);
  } else {
    combine_kernel<__nv_bfloat16><<<grid, kCombineThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_row_scales_to_group_layout(const GroupScaleParams& p, cudaStream_t stream) {
  row_scales_to_group_layout_kernel<<<p.groups, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_zero_tail_rows(void* d, int64_t rows, int64_t row_bytes, const int32_t* offsets, int groups,
                                  cudaStream_t stream) {
  const int64_t blocks = (rows + kTailRowsPerBlock - 1) / kTailRowsPerBlock;
  zero_tail_rows_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(d, rows, row_bytes, offsets,
                                                                                groups);
  return cudaGetLastError();
}

}  // namespace tokenspeed::moe_sm90
