// Decode-sized fp8 experts (DeepSeek 128 x 128 block-scaled e4m3 weights, activations
// quantised per 128 values): the grouped GEMVs of the decode path on the tensor cores.
//
// With e4m3 operands a CUDA-core GEMV would spend more instructions converting bytes to
// floats than the weights take to arrive, so each warp runs mma.sync m16n8k32 (e4m3 x e4m3
// -> fp32) with the weights as the 16-row A operand and the task's (at most 4) activation
// rows as the 8-column B operand (columns past the task's rows are zeros): "swap AB".
//
// Operands come straight from global memory in the fragment registers. A dot product does
// not care in which order K is visited, as long as A and B visit it in the same order, so
// each lane loads 16 contiguous bytes of its two A rows (g and g + 8, g = lane / 4) and of
// its B column (token g) at byte 16 * (lane % 4) of a 64-byte chunk, and the chunk feeds two
// mmas: words 0-1 of every load to the first, words 2-3 to the second. The same logical k
// thereby meets the same physical k in A and B (see mma_chunk).
//
// Scales: a 128-value K group is two chunks = four mmas into a fresh fp32 fragment, which is
// then added to the accumulator times w_scale[tile rows / 128, group] * x_scale[token, group]
// (the DeepSeek recipe: promote to fp32 with both scales once per 128 of K). A 16-row tile
// lies inside one 128-row scale block.
//
// gate/up: a warp owns gate rows [i0, i0 + 16) and up rows inter + [i0, i0 + 16) of one
// task and writes act = silu(gate) * up in bf16 (the contract's intermediate); a small kernel
// then quantises act per 128 (as the reference), and the down GEMV writes fp32 rows for the
// combine. Deterministic: fixed mma and group order, no atomics.
#include <cuda_bf16.h>

#include <cstdint>

#include "moe/moe_sm90.h"
#include "moe/sm90/moe_sm90_common.cuh"

namespace tokenspeed::moe_sm90 {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;       // A rows of one mma
constexpr int kChunk = 64;          // K bytes of one lane-row's 16-byte loads across 4 lanes
constexpr int kQuantThreads = 256;

__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 64-byte K chunk = two mmas. lo / hi: this lane's 16 bytes of A rows g / g + 8; x: its
// 16 bytes of B column g. Fragment k of mma j (A: a0/a1 hold k = 4t..4t+3, a2/a3 k + 16;
// B: b0 k = 4t..4t+3, b1 k + 16; t = lane % 4) is byte 16t + 8j (+4 for the upper half)
// of the chunk in both operands.
__device__ __forceinline__ void mma_chunk(float (&d)[4], uint4 lo, uint4 hi, uint4 x) {
  mma_e4m3(d, lo.x, hi.x, lo.y, hi.y, x.x, x.y);
  mma_e4m3(d, lo.z, hi.z, lo.w, hi.w, x.z, x.w);
}

template <bool kGateUp>
__global__ void __launch_bounds__(kThreads) decode_fp8_kernel(DecodeFp8Params p) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int tiles = kGateUp ? p.n / 2 / kTileRows : p.n / kTileRows;
  const int tile = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (tile >= tiles) return;  // whole warps only: nothing below synchronises the block
  const int kb = p.k / kScaleBlock;
  const int n_tasks = *p.num_tasks;
  const int row_a = tile * kTileRows;                       // gate rows / down rows
  const int row_b = kGateUp ? p.n / 2 + row_a : row_a;      // up rows (gate/up only)
  for (int ti = blockIdx.y; ti < n_tasks; ti += gridDim.y) {
    const DecodeTask task = p.tasks[ti];
    // B column g: the task's row g (zeros past its rows); this lane's scale columns 2t, 2t + 1.
    const bool has_x = g < task.rows;
    int64_t x_row = 0;
    if (has_x) x_row = p.row_slot != nullptr ? p.row_slot[task.row + g] / p.top_k : task.row + g;
    const uint8_t* x = p.x + x_row * p.k + 16 * t;
    int64_t s_row[2];
    bool s_ok[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int r = 2 * t + c;
      s_ok[c] = r < task.rows;
      s_row[c] = !s_ok[c] ? 0 : (p.row_slot != nullptr ? p.row_slot[task.row + r] / p.top_k : task.row + r);
    }
    const uint8_t* w = p.w + static_cast<int64_t>(task.expert) * p.n * p.k + 16 * t;
    const uint8_t* wa = w + static_cast<int64_t>(row_a + g) * p.k;
    const uint8_t* wb = w + static_cast<int64_t>(row_b + g) * p.k;
    const int64_t eight_rows = static_cast<int64_t>(8) * p.k;
    const float* ws = p.w_scale + static_cast<int64_t>(task.expert) * (p.n / kScaleBlock) * kb;
    const float* ws_a = ws + static_cast<int64_t>(row_a / kScaleBlock) * kb;
    const float* ws_b = ws + static_cast<int64_t>(row_b / kScaleBlock) * kb;
    float acc_a[4] = {0, 0, 0, 0}, acc_b[4] = {0, 0, 0, 0};
#pragma unroll 2
    for (int grp = 0; grp < kb; ++grp) {
      const int off = grp * kScaleBlock;
      uint4 a_lo[2], a_hi[2], b_lo[2], b_hi[2], xv[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        a_lo[c] = load_stream16(wa + off + c * kChunk);
        a_hi[c] = load_stream16(wa + eight_rows + off + c * kChunk);
        if constexpr (kGateUp) {
          b_lo[c] = load_stream16(wb + off + c * kChunk);
          b_hi[c] = load_stream16(wb + eight_rows + off + c * kChunk);
        }
        xv[c] = has_x ? __ldg(reinterpret_cast<const uint4*>(x + off + c * kChunk)) : make_uint4(0, 0, 0, 0);
      }
      float sx[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) sx[c] = s_ok[c] ? __ldg(p.x_scale + s_row[c] * kb + grp) : 0.0f;
      float part_a[4] = {0, 0, 0, 0};
#pragma unroll
      for (int c = 0; c < 2; ++c) mma_chunk(part_a, a_lo[c], a_hi[c], xv[c]);
      const float swa = __ldg(ws_a + grp);
      // fragment i: A row g (i < 2) or g + 8, B column 2t + (i & 1)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc_a[i] = fmaf(part_a[i], swa * sx[i & 1], acc_a[i]);
      if constexpr (kGateUp) {
        float part_b[4] = {0, 0, 0, 0};
#pragma unroll
        for (int c = 0; c < 2; ++c) mma_chunk(part_b, b_lo[c], b_hi[c], xv[c]);
        const float swb = __ldg(ws_b + grp);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc_b[i] = fmaf(part_b[i], swb * sx[i & 1], acc_b[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 2 * t + (i & 1);
      if (r >= task.rows) continue;
      const int64_t row = task.row + r;
      const int col = row_a + g + (i < 2 ? 0 : 8);
      if constexpr (kGateUp) {
        const float gate = acc_a[i];
        const float act = __fdiv_rn(gate, 1.0f + expf(-gate)) * acc_b[i];  // as silu_mul_kernel
        static_cast<__nv_bfloat16*>(p.out)[row * (p.n / 2) + col] = __float2bfloat16_rn(act);
      } else {
        static_cast<float*>(p.out)[row * p.n + col] = acc_a[i];
      }
    }
  }
}

// Rows [0, *rows_valid) of a bf16 matrix to e4m3 + row-major [rows, k/128] scales.
__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(QuantizeRowsParams p) {
  const int row = blockIdx.x;
  if (p.rows_valid != nullptr && row >= *p.rows_valid) return;
  const int kb = p.k / kScaleBlock;
  const auto* src = reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.in) + row * p.in_stride);
  auto* dst = reinterpret_cast<uint2*>(static_cast<uint8_t*>(p.out) + static_cast<int64_t>(row) * p.k);
  quantize_row(kb, dst, p.out_scale, Bf16RowLoad{src}, [&](int g) { return static_cast<int64_t>(row) * kb + g; });
}

cudaError_t launch(void (*kernel)(DecodeFp8Params), const DecodeFp8Params& p, int tiles, int max_tasks,
                   cudaStream_t stream) {
  kernel<<<decode_grid((tiles + kWarps - 1) / kWarps, max_tasks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_decode_fp8_gate_up_silu(const DecodeFp8Params& p, int max_tasks, cudaStream_t stream) {
  return launch(decode_fp8_kernel<true>, p, p.n / 2 / kTileRows, max_tasks, stream);
}

cudaError_t launch_decode_fp8_down(const DecodeFp8Params& p, int max_tasks, cudaStream_t stream) {
  return launch(decode_fp8_kernel<false>, p, p.n / kTileRows, max_tasks, stream);
}

cudaError_t launch_quantize_rows(const QuantizeRowsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  quantize_rows_kernel<<<p.rows, kQuantThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace tokenspeed::moe_sm90
