// Shared-memory layout, register budget and named barriers of the Hopper MLA prefill
// kernel (mla_prefill_sm90_kernel.cuh, whose header draws the layout).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mla/prefill/mla_prefill_sm90.h"

namespace tokenspeed::mla_prefill_sm90 {

template <int kHeadDimQK>
struct SmemLayout {
  static_assert(kHeadDimQK % 64 == 0 && kHeadDimQK >= 64 && kHeadDimQK <= 256, "head_dim_qk: multiple of 64");
  static_assert(kBlockM == 128 && kBlockN == 128, "Q and K panels share one shape: 128 rows x 128 bytes");
  static constexpr int kPanelBytes = 128 * 128;
  static constexpr int kQkPanels = kHeadDimQK / 64;
  static constexpr int kVPanels = kHeadDimV / 64;
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kQkPanels * kPanelBytes;
  static constexpr int kKBytes = kQkPanels * kPanelBytes;
  static constexpr int kVBytes = kVPanels * kPanelBytes;
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kQBytes;
  static constexpr int kVOff = kKOff + kStages * kKBytes;
  static constexpr int kBarOff = kVOff + kStages * kVBytes;
  static constexpr int kQFull = kBarOff;
  static constexpr int kQEmpty = kQFull + 8;
  static constexpr int kKFull = kQEmpty + 8;
  static constexpr int kKEmpty = kKFull + 8 * kStages;
  static constexpr int kVFull = kKEmpty + 8 * kStages;
  static constexpr int kVEmpty = kVFull + 8 * kStages;
  static constexpr int kSmemUsed = kVEmpty + 8 * kStages;
  static constexpr int kSmemBytes = kSmemUsed + 1024;  // slack to align the base to 1024
  static_assert(kSmemBytes <= 227 * 1024, "prefill kernel exceeds the 227 KB shared memory limit");
  static_assert(kKOff % 1024 == 0 && kVOff % 1024 == 0, "swizzle atoms need 1024-byte alignment");
};

constexpr int kConsumerWarps = 8;
constexpr int kProducerRegs = 40;   // setmaxnreg: 128 x 40 + 256 x 232 = 64512 <= 65536
constexpr int kConsumerRegs = 232;
// Named barriers (0 is __syncthreads).
constexpr int kBarSched = 1;  // 1 + w: consumer w's turn to issue (256 = its 128 + the other's 128)
constexpr int kBarWg = 3;     // 3 + w: consumer w alone (after zeroing V rows)
// Conditional rescale: a row's exponent base moves only when its max grows by more than
// this (log2 units, a factor 256); P <= 2^8 then, exact enough in bf16 and fp32.
constexpr float kRescaleThreshold = 8.0f;
constexpr float kLn2 = 0.69314718055994530942f;

}  // namespace tokenspeed::mla_prefill_sm90
