// Launch interface of the Hopper (sm_90a) MLA prefill kernel (no torch types).
//
// Non-absorbed ragged attention: q [total_q, heads, Dqk], k [total_k, kv_heads, Dqk],
// v [total_k, kv_heads, 128] (bf16), sequences packed back to back and described by
// cu_seqlens_q / cu_seqlens_k on the device. Causal is bottom-right aligned: query i of
// a sequence with lq queries and lk keys sees keys j <= lk - lq + i.
//
// Work decomposition (the "schedule", shared by host, producer and consumers):
//   * a work tile is (sequence b, query head h, m-block) = 128 query rows of one head;
//   * sequence b has mb_b = ceil(lq_b / 128) m-blocks and heads * mb_b tiles; tiles of
//     b come before those of b + 1;
//   * inside b the heads are cut into L2 sections of `section_heads(lk_b)` heads (as
//     many kv heads as fit the L2 budget); a section lists its tiles m-block by m-block,
//     heaviest (last) m-block first, heads fastest. Tiles that run at the same time thus
//     read the same few heads' K/V, which stay in L2;
//   * the grid is persistent: CTA c takes tiles c, c + grid, c + 2 grid, ... Every CTA
//     walks the schedule itself from cu_seqlens (no host sync, no workspace), so a
//     CUDA graph follows new lengths on replay.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDACC__)
#define TS_PREFILL_HD __host__ __device__ __forceinline__
#else
#define TS_PREFILL_HD inline
#endif

namespace tokenspeed::mla_prefill_sm90 {

constexpr int kBlockM = 128;    // query rows per work tile: two consumer warpgroups x 64
constexpr int kBlockN = 128;    // keys per pipeline stage
constexpr int kHeadDimV = 128;  // value dims (N of the P V wgmma)
constexpr int kThreads = 384;   // producer warpgroup + two consumer warpgroups
constexpr int kMaxSectionHeads = 16;

// Everything the kernel reads besides the TMA descriptors. Pointers are device pointers.
struct MlaPrefillSm90Params {
  const int32_t* cu_seqlens_q;  // [batch + 1] cumulative query lengths
  const int32_t* cu_seqlens_k;  // [batch + 1] cumulative key lengths
  void* out;                    // bf16 [total_q, heads, 128] contiguous
  float* lse;                   // fp32 [total_q, heads] contiguous, natural log
  int64_t l2_budget;            // bytes of K/V the concurrently running tiles should share in L2
  float scale_log2;             // softmax_scale * log2(e), > 0: scores go to the exp2 domain
  int batch;                    // sequences
  int heads;                    // query heads
  int kv_group;                 // heads / kv_heads (1 for MLA's non-absorbed form)
  int total_q;                  // q.shape[0]: rows outside [0, total_q) are never written
  int causal;                   // 1: bottom-right causal mask
};

// What the host needs to encode the TMA descriptors (elements, not bytes).
struct MlaPrefillSm90Tensors {
  const void* q;
  const void* k;
  const void* v;
  int64_t total_q, total_k;
  int64_t heads, kv_heads;
  int64_t q_stride_t, q_stride_h;  // q.stride(0), q.stride(1)
  int64_t k_stride_t, k_stride_h;
  int64_t v_stride_t, v_stride_h;
};

// ---- The schedule's integer arithmetic (host + device) ----

TS_PREFILL_HD int m_blocks(int lq) { return lq > 0 ? (lq + kBlockM - 1) / kBlockM : 0; }

// Heads per L2 section for a sequence of lk keys: the largest power of two (<= 16,
// <= heads) whose K/V fit the budget; at least 1.
TS_PREFILL_HD int section_heads(int64_t lk, int heads, int kv_group, int head_dim_qk, int64_t l2_budget) {
  const int64_t per_kv_head = (lk > 0 ? lk : 1) * (head_dim_qk + kHeadDimV) * 2;
  int64_t fit = l2_budget / per_kv_head * kv_group;  // query heads sharing those kv heads
  int s = 1;
  while (s * 2 <= kMaxSectionHeads && s * 2 <= fit) s *= 2;
  return s < heads ? s : heads;
}

// Keys a work tile iterates over: [0, kv_end), in ceil(kv_end / kBlockN) stages.
// Causal: the last row (m0 + 127) sees keys <= lk - lq + m0 + 127. <= 0: no key at all.
TS_PREFILL_HD int kv_end_of(int lq, int lk, int m0, int causal) {
  if (!causal) return lk;
  const int e = lk - lq + m0 + kBlockM;
  return e < lk ? e : lk;
}
TS_PREFILL_HD int kv_tiles_of(int kv_end) { return kv_end > 0 ? (kv_end + kBlockN - 1) / kBlockN : 0; }

// Tiles [0, n) are visible in full to every row from `row0` on: no mask needed there.
TS_PREFILL_HD int kv_unmasked_tiles(int lq, int lk, int row0, int causal) {
  int e = lk;
  if (causal) {
    const int c = lk - lq + row0 + 1;
    e = c < lk ? c : lk;
  }
  return e > 0 ? e / kBlockN : 0;
}

// Grid size: one CTA per SM, fewer when there are fewer tiles (max_seqlen_q bounds them;
// the device schedule itself uses the real lengths, so any grid >= 1 is correct).
inline int grid_size(int64_t batch, int64_t heads, int64_t max_seqlen_q, int num_sms) {
  const int64_t bound = batch * heads * ((max_seqlen_q + kBlockM - 1) / kBlockM);
  if (bound < 1) return 1;
  return bound < num_sms ? static_cast<int>(bound) : num_sms;
}

// Dynamic shared memory of the head_dim_qk = 192 kernel (bytes), for the launcher.
size_t mla_prefill_sm90_d192_smem_bytes();

// Encodes the TMA descriptors over q, k, v and launches the head_dim_qk = 192 kernel
// with `grid` persistent CTAs on `stream`. Returns the first error; cudaErrorInvalidValue
// with `*bad_tensor` set ("q", "k" or "v") when a descriptor cannot be encoded.
cudaError_t launch_mla_prefill_sm90_d192(const MlaPrefillSm90Params& params, const MlaPrefillSm90Tensors& t,
                                         int grid, cudaStream_t stream, const char** bad_tensor);

}  // namespace tokenspeed::mla_prefill_sm90
