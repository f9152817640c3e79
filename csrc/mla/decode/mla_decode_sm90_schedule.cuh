// How a CTA of the Hopper MLA decode kernel finds its work: a block-wide scan, and the walk
// over the device-side plan (mla_decode_sm90.h) that producer and consumers both follow.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_layout.cuh"

namespace tokenspeed::mla_sm90::dev {

// ---- block-wide scan over the 12 warps of the CTA ----
__device__ __forceinline__ int block_inclusive_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const int s = scratch[w];
    before += w < warp ? s : 0;
    all += s;
  }
  __syncthreads();  // scratch may be rewritten by the next call
  total = all;
  return v + before;
}

// Sums of v[0 .. kN) over the CTA, for every thread; scratch[32 + warp * kN + j] is used.
template <int kN>
__device__ __forceinline__ void block_sums(int (&v)[kN], int* scratch) {
  static_assert(32 + (kThreads / 32) * kN <= kPlanInts, "plan scratch too small");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], o);
    if (lane == 0) scratch[32 + warp * kN + j] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    v[j] = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) v[j] += scratch[32 + w * kN + j];
  }
  __syncthreads();  // scratch may be rewritten
}

// The per-slot capacity C of the plan (mla_decode_sm90.h): the cheapest by plan_cost of
// c0 .. c0 + plan_window - 1, the smaller on ties. Every CTA computes the same value.
__device__ __forceinline__ int choose_per_slot(const MlaDecodeSm90Params& p, int capacity, int c0, int* scratch) {
  int pieces[kPlanWindow] = {};
  int running = 0;
  for (int base = 0; base < p.batch; base += kThreads) {
    const int b = base + static_cast<int>(threadIdx.x);
    const int tiles = b < p.batch ? seq_tiles(clamp_len(__ldg(p.seqlens + b), capacity)) : 0;
    const int c = seq_cost(tiles);
    int chunk_total;
    const int start = running + block_inclusive_scan(c, scratch, chunk_total) - c;
    if (tiles > 0) {
#pragma unroll
      for (int j = 0; j < kPlanWindow; ++j) {
        if (j < p.plan_window) pieces[j] += split_pieces(start, tiles, c0 + j);
      }
    }
    running += chunk_total;
  }
  block_sums(pieces, scratch);
  int best = c0;
  float best_cost = plan_cost(c0, pieces[0], p.rows, p.slots);
#pragma unroll
  for (int j = 1; j < kPlanWindow; ++j) {
    const float cost = plan_cost(c0 + j, pieces[j], p.rows, p.slots);
    if (j < p.plan_window && cost < best_cost) {
      best = c0 + j;
      best_cost = cost;
    }
  }
  return best;
}

// This CTA's share of the plan (see mla_decode_sm90.h).
struct SlotRange {
  int x0, x1;        // plan positions [x0, x1) owned by this slot
  int per_slot;      // plan units per slot
  int first_b;       // the sequence whose plan range holds x0
  int first_start;   // its P_b
  int capacity;      // block-table capacity in tokens (lengths are clamped to it)
  int slot;          // this CTA's slot
};

// The slot range in the plan scratch (kPlanOff): first_b / first_start at [16, 18) (written
// during the plan), the rest at [18, 23). The register-widened consumers (variants 5, 6) re-read
// it at each segment instead of holding it across the tile loop, where O^T leaves no registers.
__device__ __forceinline__ void store_slot_range(int* scratch, const SlotRange& sr) {
  scratch[18] = sr.x0;
  scratch[19] = sr.x1;
  scratch[20] = sr.per_slot;
  scratch[21] = sr.capacity;
  scratch[22] = sr.slot;
}
__device__ __forceinline__ SlotRange load_slot_range(const int* scratch) {
  const volatile int* s = scratch;  // volatile: read where used, never kept in registers
  return SlotRange{s[18], s[19], s[20], s[16], s[17], s[21], s[22]};
}

struct SegIter {
  int b;      // next sequence to look at
  int start;  // its plan start P_b
};

// A maximal run of tiles of one sequence inside this slot.
struct Segment {
  int b;      // sequence
  int len;    // keys of the sequence (clamped)
  int tiles;  // ceil(len / 64)
  int t0, t1; // tiles [t0, t1) of the sequence belong to this CTA
  int start;  // the sequence's plan start P_b
};

// Next segment with at least one tile; producer and consumers walk identical lists.
__device__ __forceinline__ bool next_segment(const MlaDecodeSm90Params& p, const SlotRange& sr,
                                             SegIter& it, Segment& seg) {
  while (it.b < p.batch && it.start < sr.x1) {
    const int len = clamp_len(__ldg(p.seqlens + it.b), sr.capacity);
    const int tiles = seq_tiles(len);
    const int first_tile_pos = it.start + kSegmentOverhead;
    const int t0 = max(sr.x0 - first_tile_pos, 0);
    const int t1 = min(sr.x1 - first_tile_pos, tiles);
    seg.b = it.b;
    seg.len = len;
    seg.tiles = tiles;
    seg.t0 = t0;
    seg.t1 = t1;
    seg.start = it.start;
    it.b += 1;
    it.start += seq_cost(tiles);
    if (t0 < t1) return true;
  }
  return false;
}

// The tiles of a CTA's plan range in order (the walk next_segment defines), one at a time.
struct TileCursor {
  SegIter it;
  Segment seg;
  int t;
  bool live;
  __device__ __forceinline__ void start(const MlaDecodeSm90Params& p, const SlotRange& sr) {
    it = SegIter{sr.first_b, sr.first_start};
    live = next_segment(p, sr, it, seg);
    t = seg.t0;
  }
  __device__ __forceinline__ void advance(const MlaDecodeSm90Params& p, const SlotRange& sr) {
    if (++t < seg.t1) return;
    live = next_segment(p, sr, it, seg);
    t = seg.t0;
  }
};

// The TMA boxes of one 64-key tile: boxes of min(page, 64) keys (a box never crosses a page),
// only as many as hold keys < len, each at its cache row through the block table. Pages past
// the sequence are never looked up; rows of the stage past the last box keep stale data, which
// the consumers mask (S) and zero (V).
struct TileBoxes {
  int boxes;
  int cache_row[4];
};
__device__ __forceinline__ TileBoxes tile_boxes(const int32_t* table, int key0, int len, int ps_log2, int box_log2) {
  TileBoxes tb;
  const int box_rows = 1 << box_log2;
  tb.boxes = (min(kBlockN, len - key0) + box_rows - 1) >> box_log2;
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    tb.cache_row[x] = 0;
    if (x < tb.boxes) {
      const int key = key0 + (x << box_log2);
      tb.cache_row[x] = (__ldg(table + (key >> ps_log2)) << ps_log2) + (key & ((1 << ps_log2) - 1));
    }
  }
  return tb;
}

}  // namespace tokenspeed::mla_sm90::dev
