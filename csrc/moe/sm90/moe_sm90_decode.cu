// Decode-sized bf16 experts: with a few rows per expert the two expert GEMMs are weight
// streams, so they run as grouped GEMVs rather than tensor-core tiles (whose 64-row tile
// would be mostly padding, and whose ~100-tile grids leave SMs idle at batch 1).
//
// Work unit: one "task" = one expert and up to kDecodeRows of its rows (the route map lists
// the tasks, moe_sm90_permute.cu). A CTA takes a block of output units of one task at a
// time; a unit is two weight rows read side by side, split over 8 lanes along K:
//   gate/up: rows i and inter + i of w13[e]  ->  act[r, i] = silu(gate) * up   (bf16)
//   down:    rows 2u and 2u + 1 of w2[e]      ->  y[r, 2u : 2u + 2]            (fp32)
// The two rows share every activation load and its conversion; the 4 units of a warp
// read the same activations, so those loads are L1 broadcasts. Weights are read once per
// task with streaming loads (no L1 allocation, 256-byte L2 prefetch); each lane keeps
// kUnroll 16-byte loads of both rows in flight.
//
// Deterministic: fp32 sums in a fixed order, 8-lane butterfly reduction, no atomics.
// Rows are read where they are: the gate/up rows straight from hidden_states through
// row_slot (no gather kernel), SiLU-and-mul is fused into the gate/up epilogue.
#include <cuda_bf16.h>

#include <cstdint>

#include "moe/moe_sm90.h"
#include "moe/sm90/moe_sm90_common.cuh"

namespace tokenspeed::moe_sm90 {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kLanes = 8;                      // lanes sharing one unit
constexpr int kUnitsPerWarp = 32 / kLanes;
constexpr int kUnitsPerBlock = kWarps * kUnitsPerWarp;
constexpr int kVec = 8;                        // bf16 values per 16-byte load
constexpr int kStep = kLanes * kVec;           // K covered by one unit per step
constexpr int kUnroll = 4;                     // steps whose weight loads are in flight at once

// acc_a[m] += <wa, x_m>, acc_b[m] += <wb, x_m> over this lane's 8 values at k0.
template <int M>
__device__ __forceinline__ void fma_step(uint4 wa_raw, uint4 wb_raw, const __nv_bfloat16* const (&x)[M], int k0,
                                         float (&acc_a)[M], float (&acc_b)[M]) {
  const Bf16x8 wa = unpack_bf16x8(wa_raw), wb = unpack_bf16x8(wb_raw);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const Bf16x8 xv = unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(x[m] + k0)));
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      acc_a[m] = fmaf(wa.v[i], xv.v[i], acc_a[m]);
      acc_b[m] = fmaf(wb.v[i], xv.v[i], acc_b[m]);
    }
  }
}

// This lane's partial dot products of weight rows wa, wb with the M activation rows, then
// summed over the unit's 8 lanes (every lane ends with the totals).
template <int M>
__device__ __forceinline__ void dot_unit(const __nv_bfloat16* wa, const __nv_bfloat16* wb,
                                         const __nv_bfloat16* const (&x)[M], int k, int lane8, float (&acc_a)[M],
                                         float (&acc_b)[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) acc_a[m] = acc_b[m] = 0.0f;
  int k0 = lane8 * kVec;
  const int k_main = k / (kStep * kUnroll) * (kStep * kUnroll);
  for (; k0 < k_main; k0 += kStep * kUnroll) {
    uint4 a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      a[u] = load_stream16(wa + k0 + u * kStep);
      b[u] = load_stream16(wb + k0 + u * kStep);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) fma_step<M>(a[u], b[u], x, k0 + u * kStep, acc_a, acc_b);
  }
  for (; k0 < k; k0 += kStep) fma_step<M>(load_stream16(wa + k0), load_stream16(wb + k0), x, k0, acc_a, acc_b);
#pragma unroll
  for (int d = kLanes / 2; d > 0; d >>= 1) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      acc_a[m] += __shfl_xor_sync(0xffffffffu, acc_a[m], d);
      acc_b[m] += __shfl_xor_sync(0xffffffffu, acc_b[m], d);
    }
  }
}

// One task's block of units with exactly M rows (M is warp-uniform: the whole CTA has it).
template <bool kGateUp, int M>
__device__ __forceinline__ void run_task(const DecodeGemvParams& p, const DecodeTask& task, int unit, bool store,
                                         int lane8) {
  const __nv_bfloat16* x[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const int row = task.row + m;
    const int64_t src = kGateUp ? p.row_slot[row] / p.top_k : row;
    x[m] = static_cast<const __nv_bfloat16*>(p.x) + src * p.x_stride;
  }
  const auto* w = static_cast<const __nv_bfloat16*>(p.w) + static_cast<int64_t>(task.expert) * p.n * p.k;
  const int row_a = kGateUp ? unit : 2 * unit;
  const int row_b = kGateUp ? unit + p.n / 2 : 2 * unit + 1;
  float acc_a[M], acc_b[M];
  dot_unit<M>(w + static_cast<int64_t>(row_a) * p.k, w + static_cast<int64_t>(row_b) * p.k, x, p.k, lane8, acc_a,
              acc_b);
  if (!store) return;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (lane8 != m) continue;  // lane m of the unit stores row m
    const int64_t row = task.row + m;
    if constexpr (kGateUp) {
      const float g = acc_a[m];
      const float act = __fdiv_rn(g, 1.0f + expf(-g)) * acc_b[m];  // as silu_mul_kernel
      static_cast<__nv_bfloat16*>(p.out)[row * (p.n / 2) + unit] = __float2bfloat16_rn(act);
    } else {
      reinterpret_cast<float2*>(static_cast<float*>(p.out) + row * p.n)[unit] = make_float2(acc_a[m], acc_b[m]);
    }
  }
}

template <bool kGateUp>
__global__ void __launch_bounds__(kThreads) decode_gemv_kernel(DecodeGemvParams p) {
  const int lane = threadIdx.x & 31;
  const int lane8 = lane % kLanes;
  const int units = p.n / 2;
  const int unit_raw = blockIdx.x * kUnitsPerBlock + (threadIdx.x >> 5) * kUnitsPerWarp + lane / kLanes;
  // Lanes past the last unit compute a duplicate of it (the shuffles need every lane) and
  // store nothing.
  const bool store = unit_raw < units;
  const int unit = store ? unit_raw : units - 1;
  const int tasks = *p.num_tasks;
  for (int t = blockIdx.y; t < tasks; t += gridDim.y) {
    const DecodeTask task = p.tasks[t];
    switch (task.rows) {
      case 1: run_task<kGateUp, 1>(p, task, unit, store, lane8); break;
      case 2: run_task<kGateUp, 2>(p, task, unit, store, lane8); break;
      case 3: run_task<kGateUp, 3>(p, task, unit, store, lane8); break;
      default: run_task<kGateUp, kDecodeRows>(p, task, unit, store, lane8); break;
    }
  }
}

cudaError_t launch(void (*kernel)(DecodeGemvParams), const DecodeGemvParams& p, int max_tasks,
                   cudaStream_t stream) {
  const int units = p.n / 2;
  const dim3 grid = decode_grid((units + kUnitsPerBlock - 1) / kUnitsPerBlock, max_tasks);
  kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

static_assert(kDecodeRows == 4, "decode_gemv_kernel's switch covers 1..4 rows per task");

cudaError_t launch_decode_gate_up_silu(const DecodeGemvParams& p, int max_tasks, cudaStream_t stream) {
  return launch(decode_gemv_kernel<true>, p, max_tasks, stream);
}

cudaError_t launch_decode_down(const DecodeGemvParams& p, int max_tasks, cudaStream_t stream) {
  return launch(decode_gemv_kernel<false>, p, max_tasks, stream);
}

}  // namespace tokenspeed::moe_sm90
