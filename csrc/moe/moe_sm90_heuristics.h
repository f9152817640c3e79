// Config choice of the sm90 MoE grouped GEMMs, in one place (host only, shape-based so a
// call's kernels depend on shapes only and can be captured in a CUDA graph).
//
// The compiled variants (csrc/moe/sm90/grouped_gemm_sm90.cuh):
//   bf16 large: 128x256x64 cooperative, cluster 2x1, bf16 or fp32 output
//   bf16 small: 64x128x128 ping-pong, no cluster, fp32 output (decode)
//   fp8 large:  128x128x128 cooperative blockwise-scaled, cluster 1x2, bf16 or fp32 output
//               (no small fp8 tile: decode-sized fp8 calls take the decode path below)
// Output: the gate/up GEMM writes fp32 (SiLU-and-mul needs the exact accumulators); the
// down GEMM and the standalone op write bf16 where that variant exists (large), else fp32.
//
// Tile (bf16): the per-expert row counts live on the device; the host only knows the
// capacity (tokens x top_k) and the number of experts, so the choice uses their ratio. A
// 128-row tile wastes at most half its rows at 64 rows per expert, where the 64-row tile's
// lower throughput per FLOP about evens out; below that the small tile wins (decode streams
// weights, and a 2x1 cluster would pair each expert's only M tile with an empty one), above
// it the large one. With expert parallelism the capacity over-counts local rows (only the
// local share of slots lands here), so the switch comes a little late.
//
// Decode path: when experts have few rows (thresholds below, measured), both expert GEMMs
// run as grouped GEMVs (bf16: moe_sm90_decode.cu on the CUDA cores; fp8: moe_sm90_decode_fp8.cu
// with mma.sync): the weights are streamed once per 4 rows of an expert, on grids sized by
// the intermediate / hidden width rather than by 64- or 128-row tiles, and the gather and
// SiLU-and-mul kernels disappear.
// TOKENSPEED_MOE_SM90_TILE=large|small overrides the bf16 tile (and turns the decode path
// off); =decode forces the decode path (benchmarks, tuning).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "moe/moe_sm90.h"

namespace tokenspeed::moe_sm90 {

constexpr int64_t kLargeTileMinRowsPerExpert = 96;
// bf16: up to 2 rows per expert on average (DeepSeek-V3 experts on the H100: 1 token 254 us
// vs 286 on the tiles, 8 / 32 tokens at copy bandwidth, 128 tokens 1.48x slower than tiles).
constexpr int64_t kDecodeMaxRowsPerExpert = 2;
// fp8: up to one row per 4 experts (1 token 163 us vs 192 on the tiles, 8 tokens even, 32
// tokens 1.2x slower, cause not profiled yet: the mma.sync GEMV computes 8 columns per task).
constexpr int64_t kDecodeFp8ExpertsPerRow = 4;

inline const char* forced_tile() { return std::getenv("TOKENSPEED_MOE_SM90_TILE"); }

inline bool use_decode_path(bool fp8, int64_t rows, int64_t groups) {
  const char* forced = forced_tile();
  if (forced != nullptr && (std::strcmp(forced, "large") == 0 || std::strcmp(forced, "small") == 0)) return false;
  if (forced != nullptr && std::strcmp(forced, "decode") == 0) return true;
  return fp8 ? rows * kDecodeFp8ExpertsPerRow <= groups : rows <= kDecodeMaxRowsPerExpert * groups;
}

inline GemmTile choose_gemm_tile(bool fp8, int64_t rows, int64_t groups) {
  if (fp8) return GemmTile::kLarge;
  const char* forced = forced_tile();
  if (forced != nullptr && std::strcmp(forced, "large") == 0) return GemmTile::kLarge;
  if (forced != nullptr && std::strcmp(forced, "small") == 0) return GemmTile::kSmall;
  return rows >= kLargeTileMinRowsPerExpert * groups ? GemmTile::kLarge : GemmTile::kSmall;
}

// The output a bf16-wanting GEMM (down, standalone) gets: bf16 where compiled, else fp32.
inline GemmOut bf16_or_f32(bool fp8, GemmTile tile) {
  return grouped_gemm_compiled(fp8, tile, GemmOut::kBF16) ? GemmOut::kBF16 : GemmOut::kF32;
}

}  // namespace tokenspeed::moe_sm90
