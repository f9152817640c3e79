// Shared-memory layout, register budget and named barriers of the Hopper MLA decode
// kernel (mla_decode_sm90_kernel.cuh); the picture of the layout is in that file's header.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mla/decode/mla_decode_sm90.h"

namespace tokenspeed::mla_sm90 {

// ---------------------------------------------------------------------------------
// Layout constants
// ---------------------------------------------------------------------------------
constexpr int kPanelBytes = 64 * 128;              // 64 rows x 64 bf16 (one 128B-swizzled panel)
constexpr int kPanels = kHeadDim / 64;             // 9
constexpr int kTileBytes = kPanels * kPanelBytes;  // 73728: 64 rows x 576 bf16
constexpr int kStages = 2;
constexpr int kRopePanel = 8;                      // panel of dims 512..575: holds P after QK^T
constexpr int kQOff = 0;
constexpr int kStageOff = kQOff + kTileBytes;
constexpr int kMaxOff = kStageOff + kStages * kTileBytes;  // float [2][2][64]
constexpr int kSumOff = kMaxOff + 2 * 2 * kBlockM * 4;     // float [2][64]
constexpr int kBarOff = kSumOff + 2 * kBlockM * 4;         // uint64 full[2], empty[2]
// int [128]: [0, 12) block scan, [16, 18) the first sequence, [18, 23) the rest of the slot range
// (store_slot_range), [32, 128) the plan candidates' sums
constexpr int kPlanOff = kBarOff + 2 * kStages * 8;
constexpr int kPlanInts = 128;
// The seesaw schedule's mbarriers: [full, empty][L half, R half][stage] (mla_decode_sm90_seesaw.cuh)
constexpr int kHalfBarOff = kPlanOff + kPlanInts * 4;
constexpr int kSmemUsed = kHalfBarOff + 2 * 2 * kStages * 8;
constexpr int kSmemBytes = kSmemUsed + 1024;               // slack to align the base to 1024
static_assert(kSmemBytes <= 227 * 1024, "decode kernel exceeds the 227 KB shared memory limit");
static_assert(kStageOff % 1024 == 0 && kTileBytes % 1024 == 0, "swizzle atoms need 1024 B alignment");

constexpr int kConsumerWarps = 8;
constexpr int kProducerRegs = 40;   // setmaxnreg: 128 x 40 + 256 x 232 = 64512 <= 65536
constexpr int kConsumerRegs = 232;
// fp8 variant: the producer warpgroup loads a whole tile of e4m3 codes into registers (18 x 16 B
// per thread) and widens them into the stage (mla_decode_sm90_fp8.cuh).
constexpr int kProducerRegsFp8 = 104;  // 128 x 104 + 256 x 200 = 64512
constexpr int kConsumerRegsFp8 = 200;
// Conditional rescale: the exponent base of a row moves only when its max grows by
// more than this (log2 units, a factor 256); P <= 2^8 then, safe in bf16 and fp32.
constexpr float kRescaleThreshold = 8.0f;
constexpr float kLn2 = 0.69314718055994530942f;

// Named barriers (0 is __syncthreads).
constexpr int kBarMax = 1;    // both consumer WGs: row maxima of this tile exchanged
constexpr int kBarP = 2;      // both consumer WGs: P of this tile in smem
constexpr int kBarSeg = 3;    // both consumer WGs: segment boundaries (Q reload)
constexpr int kBarEpi = 4;    // both consumer WGs: row sums exchanged
constexpr int kBarWg = 5;     // 5 + w: one consumer WG (tail rows zeroed)
constexpr int kBarA = 7;      // seesaw: WG0 -> WG1, tile a's base and P are in smem
constexpr int kBarB = 8;      // seesaw: WG1 -> WG0, tile b's base and P are in smem
// fp8 variant 5 (mla_decode_sm90_fp8_regs.cuh): consumer WG1 keeps kBarMax / kBarP / kBarEpi,
// WG2 uses these; kBarMerge: both, the segment's two halves merged.
constexpr int kBarMax2 = 9;
constexpr int kBarP2 = 10;
constexpr int kBarEpi2 = 11;
constexpr int kBarMerge = 12;

}  // namespace tokenspeed::mla_sm90
