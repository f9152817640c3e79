// Launch interface of the Hopper (sm_90a) MLA decode kernel (no torch types).
//
// One CTA computes 64 query rows (rows = q_len x heads of one sequence, row
// r = i * heads + h) against a contiguous range of 64-key tiles of one or more
// sequences. The split of the keys over the CTAs ("the plan") is computed on the
// device from cache_seqlens by every CTA (see mla_decode_sm90_kernel.cuh), so the
// launch shape depends only on tensor shapes and the number of SMs: nothing is
// read back to the host and the whole op can be captured in a CUDA graph.
//
// The plan, shared by the decode kernel and the combine kernel:
//   * sequence b with L_b keys has n_b = ceil(L_b / 64) tiles and costs
//     n_b + kSegmentOverhead plan units (0 when n_b = 0);
//   * the sequences' costs are laid end to end, P_b = sum of costs before b,
//     T = total; plan position P_b + kSegmentOverhead + t is tile t of b;
//   * slot s (of `slots` per 64-row block) owns positions [s * C, (s + 1) * C);
//     C is the cheapest (plan_cost) of C0 .. C0 + plan_window - 1,
//     C0 = max(ceil(T / slots), min_split) (min_split: kMinSplitCost unless overridden):
//     a slightly larger C can keep every sequence in one slot (128 sequences of 130 units
//     on 132 slots: C0 = 127 splits all of them, C = 130 none), which saves the partials;
//   * a sequence whose tiles all fall in one slot is written straight to out/lse;
//     otherwise each slot writes a normalised fp32 partial (out, lse) at partial
//     index partial_index(s, P_b, C) and the combine kernel merges them. The decode
//     kernel stores C in ws_plan[0] for the combine kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDACC__)
#define TS_MLA_HD __host__ __device__ __forceinline__
#else
#define TS_MLA_HD inline
#endif

namespace tokenspeed::mla_sm90 {

constexpr int kHeadDim = 576;      // latent 512 + rope 64
constexpr int kHeadDimV = 512;     // values: the first 512 dims of each cached token
constexpr int kBlockM = 64;        // query rows per CTA (one wgmma M tile)
constexpr int kBlockN = 64;        // keys per pipeline stage
constexpr int kMaxQLen = 8;        // speculative tokens per sequence supported
constexpr int kMaxHeads = 128;     // query heads per rank supported
constexpr int kMinPageLog2 = 4;    // page sizes 16 ..
constexpr int kMaxPageLog2 = 8;    // .. 256 tokens (powers of two)
constexpr int kSegmentOverhead = 2;  // plan units charged per sequence (Q load, pipeline fill, epilogue)
// Default smallest plan range a slot is given (params.min_split). 1: a short sequence is spread
// over as many CTAs as it has tiles. H100, batch 1, 16 heads (bench_mla_decode.py --shapes engine
// --min-split-sweep, 2026-11-23): 1K keys 10.2 / 11.9 / 16.0 us at 1 / 2 / 4, 4K 11.9 / 13.6 /
// 16.4, 16K 20.5 / 20.3 / 20.2, 64K and batch 32 x 4K unchanged (the plan already gives > 4).
constexpr int kMinSplitCost = 1;
// Per-slot capacities the plan tries (C0 .. C0 + kPlanWindow - 1) and their cost model, in
// plan units (one unit ~ one 64-key tile of one CTA):
//   cost(C) = C + (any split ? kCombineUnits : 0) + pieces * rows' / (kPartialRowsPerUnit * slots)
// pieces: the pieces of all split sequences; rows' = min(rows, 64). A piece's fp32 partial is
// written once and read once by the combine: rows' x 512 x 4 B x 2 = rows' x 4 KB, and a
// 64 x 576 bf16 tile is 72 KB, so 18 rows of a piece cost one tile's traffic, spread over the
// slots; kCombineUnits stands for the combine kernel's tail when it has work.
constexpr int kPlanWindow = 8;
constexpr float kPartialRowsPerUnit = 18.f;
constexpr float kCombineUnits = 1.f;
constexpr int kThreads = 384;        // producer warpgroup + two consumer warpgroups

// Everything the decode and combine kernels read. Pointers are device pointers.
struct MlaDecodeSm90Params {
  const void* q;                // bf16 [batch, q_len, heads, 576]; rows 16-byte aligned
  int64_t q_stride_b;           // elements between sequences of q (multiple of 8)
  int64_t q_stride_i;           // elements between query positions of q (multiple of 8)
  int64_t q_stride_h;           // elements between heads of q (multiple of 8)
  const int32_t* block_table;   // [batch, max_pages]: logical page -> page of kv_cache
  int64_t block_table_stride;   // elements between rows of block_table
  const int32_t* seqlens;       // [batch] keys per sequence incl. the q_len new tokens
  void* out;                    // bf16 [batch, q_len, heads, 512] contiguous (row b * rows + r)
  float* lse;                   // fp32 [batch, q_len, heads] contiguous, natural log
  const float* kv_scale;        // fp8 cache: [1] per-tensor dequantisation scale (device); bf16: nullptr
  const uint8_t* kv_codes;      // fp8 cache: e4m3 [num_pages, page_size, 576] (read without TMA); bf16: nullptr
  float* ws_out;                // fp32 [2 * slots, rows, 512]: normalised partial outputs
  float* ws_lse;                // fp32 [2 * slots, rows]: partial lse (natural log)
  int* ws_plan;                 // [1]: the per-slot plan units C the decode kernel chose (read by the combine)
  float scale_log2;             // softmax_scale * log2(e): scores go to the exp2 domain
  int batch;                    // sequences
  int q_len;                    // new tokens per sequence (1 .. kMaxQLen)
  int heads;                    // query heads (1 .. kMaxHeads)
  int rows;                     // q_len * heads: query rows per sequence
  int m_blocks;                 // ceil(rows / 64): CTAs that share one key range
  int slots;                    // key ranges per 64-row block (grid = slots * m_blocks)
  int max_pages;                // block_table.shape[1]; lengths are clamped to its capacity
  int page_size_log2;           // log2(page_size), kMinPageLog2 .. kMaxPageLog2
  int causal;                   // 1: query i sees keys < L - q_len + i + 1 (bottom-right)
  int combine_dsplit;           // combine kernel: 1 (a warp per row, 512 dims) or 4 (a block per row and 128 dims)
  int min_split;                // smallest plan range a slot is given (plan units, >= 1)
  int plan_window;              // per-slot capacities tried, C0 .. C0 + plan_window - 1 (1 .. kPlanWindow)
  int schedule;                 // 0: both consumer warpgroups in lockstep per tile; 1: seesaw (pairs of tiles;
                                // fp8 cache: the transposed consumer at <= 32 rows, lockstep above)
};

// ---- The plan: integer arithmetic shared by host, decode and combine kernels ----

TS_MLA_HD int m_blocks_for(int rows) { return (rows + kBlockM - 1) / kBlockM; }

// Key ranges per 64-row block so that slots * m_blocks CTAs fill the SMs once.
TS_MLA_HD int slots_for(int num_sms, int m_blocks) {
  const int s = num_sms / m_blocks;
  return s < 1 ? 1 : s;
}

// A device-side length made safe: negative -> 0, beyond the block table -> its capacity.
TS_MLA_HD int clamp_len(int len, int capacity) {
  return len < 0 ? 0 : (len > capacity ? capacity : len);
}

TS_MLA_HD int seq_tiles(int len) { return (len + kBlockN - 1) / kBlockN; }

TS_MLA_HD int seq_cost(int tiles) { return tiles > 0 ? tiles + kSegmentOverhead : 0; }

TS_MLA_HD int cost_per_slot(int total, int slots, int min_split) {
  const int c = (total + slots - 1) / slots;
  return c < min_split ? min_split : c;
}

// The slots holding the first and the last tile of a sequence (plan start `start`, `tiles` > 0)
// at `per_slot` units per slot.
struct SlotSpan {
  int lo, hi;
};
TS_MLA_HD SlotSpan slot_span(int start, int tiles, int per_slot) {
  const int first = start + kSegmentOverhead;  // plan position of tile 0
  return {first / per_slot, (first + tiles - 1) / per_slot};
}

// Pieces of such a sequence when split at `per_slot`; 0 when its tiles all fall in one slot.
TS_MLA_HD int split_pieces(int start, int tiles, int per_slot) {
  const SlotSpan s = slot_span(start, tiles, per_slot);
  return s.hi > s.lo ? s.hi - s.lo + 1 : 0;
}

// The plan's cost model (see kPlanWindow) for per-slot capacity c with `pieces` split pieces.
TS_MLA_HD float plan_cost(int c, int pieces, int rows, int slots) {
  const int r = rows < kBlockM ? rows : kBlockM;
  return static_cast<float>(c) + (pieces > 0 ? kCombineUnits : 0.f) +
         static_cast<float>(pieces) * static_cast<float>(r) / (kPartialRowsPerUnit * static_cast<float>(slots));
}

// Where slot `slot` stores its partial of the sequence whose plan range starts at
// seq_start: each slot has at most one split sequence starting at or before its first
// position (index 2 * slot) and at most one starting after it (index 2 * slot + 1).
TS_MLA_HD int partial_index(int slot, int seq_start, int per_slot) {
  return 2 * slot + (seq_start <= slot * per_slot ? 0 : 1);
}

// Workspace floats: partial outputs, partial lse, then one int (ws_plan).
TS_MLA_HD int64_t workspace_out_floats(int slots, int rows) {
  return 2LL * slots * rows * kHeadDimV;
}
TS_MLA_HD int64_t workspace_lse_floats(int slots, int rows) { return 2LL * slots * rows; }
TS_MLA_HD int64_t workspace_floats(int slots, int rows) {
  return workspace_out_floats(slots, rows) + workspace_lse_floats(slots, rows) + 1;
}

// Dynamic shared memory of the decode kernel (bytes), for the launcher's checks.
size_t decode_smem_bytes();

// Launches the decode kernel then the combine kernel on `stream`. kv_cache is the
// bf16 [num_pages, page_size, 576] cache (16-byte aligned); the TMA descriptor over
// it is encoded here. Returns the first error (encoding or launch).
cudaError_t launch_mla_decode_sm90(const MlaDecodeSm90Params& params, const void* kv_cache,
                                   int64_t num_pages, cudaStream_t stream);

// The same over an e4m3 [num_pages, page_size, 576] cache with params.kv_scale set
// (mla_decode_sm90_fp8.cu): at most 32 rows run the transposed consumer unless params.schedule
// is 0 (the 64-row lockstep consumers, which every larger row count runs).
cudaError_t launch_mla_decode_sm90_fp8(const MlaDecodeSm90Params& params, const void* kv_cache,
                                       int64_t num_pages, cudaStream_t stream);

// The combine kernel alone (called by launch_mla_decode_sm90).
cudaError_t launch_mla_decode_sm90_combine(const MlaDecodeSm90Params& params,
                                           cudaStream_t stream);

}  // namespace tokenspeed::mla_sm90
