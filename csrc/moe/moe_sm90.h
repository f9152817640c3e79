// Hopper (sm_90a) MoE: plain parameter structs and launch functions shared by the
// device code (csrc/moe/sm90/*.cu, no torch headers) and the torch launcher
// (csrc/moe/moe_sm90_cuda.cpp). Design notes: csrc/moe/README.md.
//
// Row layout used throughout: the T * top_k (token, slot) pairs routed to this rank's
// experts are permuted into "rows", grouped by local expert (stable: token order within
// an expert), with no padding. Group g owns rows [start_g, end_g); `expert_end` (the
// inclusive cumulative ends, torch._grouped_mm's `offs`) is what the grouped GEMM reads.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace tokenspeed::moe_sm90 {

// DeepSeek fp8: activations are scaled per row in groups of 128 values, weights per
// 128 x 128 block; the largest finite e4m3 value is 448.
constexpr int kScaleBlock = 128;
constexpr float kE4m3Max = 448.0f;

// Slots handled by one block of the routing-map kernels (a shape-only constant, so the
// grids depend on shapes only and the step can be captured in a CUDA graph).
constexpr int kMapChunk = 1024;

// Which compiled tile shape a grouped GEMM runs (heuristics: moe_sm90_heuristics.h).
enum class GemmTile : int {
  kLarge = 0,  // 128-row tiles, cooperative (two consumer warp groups share one tile)
  kSmall = 1,  // 64-row tiles, ping-pong (bf16 decode: few rows per expert)
};

// Element type of a grouped GEMM's output.
enum class GemmOut : int {
  kBF16 = 0,
  kF32 = 1,  // the gate/up GEMM: SiLU-and-mul reads the exact fp32 accumulators
};

// One grouped GEMM: for each group g, D[start_g:end_g] = A[start_g:end_g] @ W[g]^T.
struct GroupedGemmParams {
  const void* a;            // [rows, k] row-major, bf16 or float8_e4m3fn
  const void* w;            // [groups, n, k] row-major, same dtype as a
  void* d;                  // [rows, n] row-major, bf16 or fp32 (GemmOut)
  const int32_t* offsets;   // [groups] inclusive cumulative row ends; clamped to [previous end, rows]
  const float* a_scale;     // fp8: group g's scales are a [k/128, m_g] block at a_scale + start_g * k/128
  const float* w_scale;     // fp8: [groups, k/128, n/128] (weight_scale_inv transposed per group)
  int64_t rows;             // rows of a and d (< 2^31)
  int n;                    // output columns
  int k;                    // reduction length
  int groups;               // number of experts
  void* workspace;          // grouped_gemm_workspace_bytes(...) bytes, 256-byte aligned
  int device;               // CUDA device ordinal
  int sm_count;             // SMs the persistent kernel spreads over
};

// Whether (fp8, tile, out) was compiled: bf16 large (bf16 / fp32 out), bf16 small (fp32
// out), fp8 large (bf16 / fp32 out). moe_sm90_heuristics.h only picks compiled ones.
bool grouped_gemm_compiled(bool fp8, GemmTile tile, GemmOut out);

// Bytes of device workspace one grouped GEMM call needs (argument arrays + CUTLASS's own).
size_t grouped_gemm_workspace_bytes(bool fp8, GemmTile tile, GemmOut out, int groups, int sm_count);

// Builds the per-group arguments on the device from `offsets` and runs the GEMM on
// `stream`. Returns nullptr on success, else a static message naming what failed.
const char* run_grouped_gemm(bool fp8, GemmTile tile, GemmOut out, const GroupedGemmParams& p,
                             cudaStream_t stream);

// The compiled variants (one translation unit each, so they compile in parallel).
size_t workspace_bytes_bf16_large_bf16(int groups, int sm_count);
size_t workspace_bytes_bf16_large_f32(int groups, int sm_count);
size_t workspace_bytes_bf16_small_f32(int groups, int sm_count);
size_t workspace_bytes_fp8_large_bf16(int groups, int sm_count);
size_t workspace_bytes_fp8_large_f32(int groups, int sm_count);
const char* run_bf16_large_bf16(const GroupedGemmParams& p, cudaStream_t stream);
const char* run_bf16_large_f32(const GroupedGemmParams& p, cudaStream_t stream);
const char* run_bf16_small_f32(const GroupedGemmParams& p, cudaStream_t stream);
const char* run_fp8_large_bf16(const GroupedGemmParams& p, cudaStream_t stream);
const char* run_fp8_large_f32(const GroupedGemmParams& p, cudaStream_t stream);

// Decode path (bf16 experts, few rows per expert; moe_sm90_decode.cu): one task is one
// expert and up to kDecodeRows consecutive rows of it. The route map lists the tasks in
// expert order; their number is at most decode_task_bound(slots, experts).
constexpr int kDecodeRows = 4;
struct DecodeTask {
  int32_t expert;  // local expert
  int32_t row;     // first row
  int32_t rows;    // 1 .. kDecodeRows
  int32_t unused;  // keeps a task one 16-byte load
};
// sum_e ceil(c_e / R) <= (slots + (R - 1) * active) / R, active <= min(experts, slots).
inline int decode_task_bound(int slots, int experts) {
  const int64_t active = slots < experts ? slots : experts;
  return static_cast<int>((slots + (kDecodeRows - 1) * active) / kDecodeRows);
}

// Sorting the (token, slot) pairs by local expert: three small kernels, no host sync.
struct RouteMapParams {
  const int32_t* topk_ids;  // [slots] global expert ids, slot = token * top_k + j
  int slots;                // tokens * top_k
  int experts;              // local experts
  int expert_offset;        // global id of local expert 0
  int chunks;               // ceil(slots / kMapChunk)
  int32_t* chunk_counts;    // [chunks, experts] workspace (per-chunk counts, then bases)
  int32_t* expert_counts;   // [experts] rows of each local expert
  int32_t* expert_start;    // [experts] first row of each expert
  int32_t* expert_end;      // [experts] inclusive cumulative ends (the grouped GEMM offsets)
  int32_t* slot_row;        // [slots] row of each slot, -1 for another rank's expert
  int32_t* row_slot;        // [slots] slot of each row (rows < expert_end[experts - 1])
  DecodeTask* decode_tasks;  // optional (decode path): [decode_task_bound(slots, experts)]
  int32_t* num_decode_tasks; // optional: [1] tasks written
};
cudaError_t launch_route_map(const RouteMapParams& p, cudaStream_t stream);

// Rows of the first GEMM: hidden_states[token of row] copied (bf16) or quantised to e4m3
// per 128-group (fp8; scales written in the grouped GEMM's per-group layout).
// The sorted-row view the route map produced, as the per-row kernels (gather, SiLU-and-mul)
// read it: which slot a row holds and, for fp8 scales, its expert's row range.
struct RowMap {
  int max_rows;             // = slots; rows >= expert_end[experts - 1] are skipped
  const int32_t* row_slot;
  const int32_t* topk_ids;  // fp8 only: the row's expert
  int expert_offset;
  int experts;
  const int32_t* expert_start;
  const int32_t* expert_counts;
  const int32_t* expert_end;
};

struct GatherParams {
  const void* x;            // [tokens, hidden] bf16, rows 16-byte aligned
  int64_t x_stride;         // elements between tokens
  int hidden;
  int top_k;
  RowMap rows;
  void* out;                // [max_rows, hidden] bf16 or e4m3
  float* out_scale;         // fp8: per-group layout (see GroupedGemmParams::a_scale)
};
cudaError_t launch_gather_rows(const GatherParams& p, bool fp8, cudaStream_t stream);

// act = silu(gate) * up from the first GEMM's [rows, 2 * inter] fp32 output, stored in
// bf16, then (fp8) quantised per 128-group like the gather.
struct SiluMulParams {
  const float* gate_up;     // [max_rows, 2 * inter] fp32
  int inter;
  RowMap rows;
  void* out;                // [max_rows, inter] bf16 or e4m3
  float* out_scale;         // fp8: per-group layout
};
cudaError_t launch_silu_mul(const SiluMulParams& p, bool fp8, cudaStream_t stream);

// out[t] = sum_j topk_weights[t, j] * down[slot_row[t * top_k + j]] in slot order, fp32
// accumulation, one rounding to bf16; slots of other ranks add nothing.
struct CombineParams {
  const void* down;             // [max_rows, hidden] bf16 or fp32 (down_f32)
  bool down_f32;
  const float* topk_weights;    // [tokens, top_k]
  const int32_t* slot_row;      // [tokens * top_k]
  int tokens;
  int top_k;
  int hidden;
  void* out;                    // [tokens, hidden] bf16
};
cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream);

// One grouped GEMV of the decode path (bf16 weights [experts, n, k], fp32 accumulation):
//   gate/up (n = 2 * inter, k = hidden): act[r, i] = silu(x_r . w[i]) * (x_r . w[inter + i]),
//     x_r = x[row_slot[r] / top_k] (hidden_states rows, no gather), act bf16 [max_rows, inter];
//   down (n = hidden, k = inter): y[r, :] = act_r . w^T, fp32 [max_rows, hidden].
struct DecodeGemvParams {
  const void* x;             // bf16 rows, x_stride elements apart, 16-byte aligned
  int64_t x_stride;
  const int32_t* row_slot;   // gate/up: row -> slot; down: unused (row r reads x row r)
  int top_k;
  const void* w;             // [experts, n, k] bf16, contiguous
  int n;                     // even; k % 8 == 0
  int k;
  const DecodeTask* tasks;
  const int32_t* num_tasks;
  void* out;
};
cudaError_t launch_decode_gate_up_silu(const DecodeGemvParams& p, int max_tasks, cudaStream_t stream);
cudaError_t launch_decode_down(const DecodeGemvParams& p, int max_tasks, cudaStream_t stream);

// The same two GEMVs for fp8 experts (moe_sm90_decode_fp8.cu, mma.sync e4m3): activations
// quantised per 128 values (quantize_rows below), weights with 128 x 128 block scales in
// the checkpoint's own [experts, n/128, k/128] layout; n and k multiples of 128.
struct DecodeFp8Params {
  const uint8_t* x;          // e4m3 rows [*, k]: gate/up per token, down per row
  const float* x_scale;      // [*, k/128] row-major, same rows as x
  const int32_t* row_slot;   // gate/up: row -> slot (x row = slot / top_k); down: nullptr
  int top_k;
  const uint8_t* w;          // [experts, n, k] e4m3, contiguous
  const float* w_scale;      // [experts, n/128, k/128]
  int n;
  int k;
  const DecodeTask* tasks;
  const int32_t* num_tasks;
  void* out;                 // gate/up: bf16 act [max_rows, n/2]; down: fp32 [max_rows, n]
};
cudaError_t launch_decode_fp8_gate_up_silu(const DecodeFp8Params& p, int max_tasks, cudaStream_t stream);
cudaError_t launch_decode_fp8_down(const DecodeFp8Params& p, int max_tasks, cudaStream_t stream);

// Rows [0, *rows_valid) (all `rows` when rows_valid is null) of a bf16 matrix to e4m3 with
// one scale per 128 values, row-major [rows, k/128] (the reference's quantisation).
struct QuantizeRowsParams {
  const void* in;            // bf16, in_stride elements between rows, 16-byte aligned
  int64_t in_stride;
  int rows;
  const int32_t* rows_valid;
  int k;                     // multiple of 128
  void* out;                 // [rows, k] e4m3
  float* out_scale;          // [rows, k/128]
};
cudaError_t launch_quantize_rows(const QuantizeRowsParams& p, cudaStream_t stream);

// Standalone grouped GEMM (fp8): a_scale given per row [rows, k/128] is rewritten into
// the per-group layout; rows past offsets[groups - 1] of d are zeroed.
struct GroupScaleParams {
  const float* row_scale;   // [rows, kb] row-major
  float* group_scale;       // per-group layout
  const int32_t* offsets;
  int groups;
  int64_t rows;
  int kb;
};
cudaError_t launch_row_scales_to_group_layout(const GroupScaleParams& p, cudaStream_t stream);
// Zeroes rows [end, rows) of d, end = the clamped maximum of offsets; row_bytes % 16 == 0.
cudaError_t launch_zero_tail_rows(void* d, int64_t rows, int64_t row_bytes, const int32_t* offsets, int groups,
                                  cudaStream_t stream);

}  // namespace tokenspeed::moe_sm90
