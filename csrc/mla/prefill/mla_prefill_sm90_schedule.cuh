// The persistent schedule of the Hopper MLA prefill kernel as one CTA walks it (the index
// arithmetic itself is in mla_prefill_sm90.h, shared with the host).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mla/prefill/mla_prefill_sm90.h"

namespace tokenspeed::mla_prefill_sm90::dev {

// One work tile: 128 query rows of head h of sequence b.
struct Work {
  int b, h, m_block;
  int q_start, lq;  // the sequence's first query token and its query count
  int k_start, lk;  // likewise for keys
};

// Walks the schedule of mla_prefill_sm90.h for this CTA. Producer and consumer threads
// each run one and see the same tiles in the same order.
template <int kHeadDimQK>
class Schedule {
 public:
  __device__ explicit Schedule(const MlaPrefillSm90Params& p) : p_(p), t_(blockIdx.x) {}

  __device__ bool next(Work& w) {
    while (t_ >= base_ + count_) {
      base_ += count_;
      if (++b_ >= p_.batch) return false;
      const int q0 = __ldg(p_.cu_seqlens_q + b_), q1 = __ldg(p_.cu_seqlens_q + b_ + 1);
      const int k0 = __ldg(p_.cu_seqlens_k + b_), k1 = __ldg(p_.cu_seqlens_k + b_ + 1);
      q_start_ = q0;
      k_start_ = k0;
      lq_ = max(q1 - q0, 0);
      lk_ = max(k1 - k0, 0);
      mb_ = m_blocks(lq_);
      sw_ = section_heads(lk_, p_.heads, p_.kv_group, kHeadDimQK, p_.l2_budget);
      count_ = mb_ * p_.heads;
    }
    const int local = t_ - base_;
    const int sec_tiles = sw_ * mb_;
    const int s = local / sec_tiles;
    const int rem = local - s * sec_tiles;
    const int width = min(sw_, p_.heads - s * sw_);
    const int r = rem / width;
    w.b = b_;
    w.h = s * sw_ + (rem - r * width);
    w.m_block = mb_ - 1 - r;  // heaviest (last) m-block of the section first
    w.q_start = q_start_;
    w.lq = lq_;
    w.k_start = k_start_;
    w.lk = lk_;
    t_ += gridDim.x;
    return true;
  }

 private:
  const MlaPrefillSm90Params& p_;
  int t_;          // next schedule index of this CTA
  int b_ = -1;     // sequence whose tiles hold t_ (once found)
  int base_ = 0;   // schedule index of b_'s first tile
  int count_ = 0;  // tiles of b_
  int q_start_ = 0, k_start_ = 0, lq_ = 0, lk_ = 0, mb_ = 0, sw_ = 1;
};

}  // namespace tokenspeed::mla_prefill_sm90::dev
