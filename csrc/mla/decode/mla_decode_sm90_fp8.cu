// The fp8-cache decode kernel's instantiations and their host-side launch (no torch):
//   * <= 16 / <= 32 rows (variants 5 / 6): the register-widened transposed consumers over
//     TMA-loaded e4m3 stages (mla_decode_sm90_fp8_regs.cuh), with a TMA descriptor over the codes;
//   * more rows, or TOKENSPEED_MLA_DECODE_SCHEDULE=lockstep (variant 2): the 64-row lockstep
//     consumers over tiles the producer widens to f16 (mla_decode_sm90_fp8.cuh), reading the codes
//     through params.kv_codes (its descriptor argument is left empty).
#include <cuda.h>
#include <cuda_runtime.h>

#include "common/sm90_host.h"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_launch.cuh"

namespace tokenspeed::mla_sm90 {
namespace {

// The codes viewed as a 2-D [num_pages * page_size, 576] byte tensor; a box is 64 codes x
// min(page_size, 64) tokens, 64-byte swizzled (one stage panel of variants 5 / 6, or part of one).
// L2 promotion 256 B: 128 B measured the same, none slower (128 x 16 x 4K 119.3 / 123.9 vs 119.6 us,
// H100 2026-11-24).
cudaError_t make_fp8_map(CUtensorMap* map, const void* kv_cache, int64_t num_pages, int page_size_log2) {
  sm90::EncodeTiledFn encode = sm90::encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const int box_rows = 1 << (page_size_log2 < 6 ? page_size_log2 : 6);
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kHeadDim), static_cast<cuuint64_t>(num_pages) << page_size_log2};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kHeadDim)};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult res = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(kv_cache), dims, strides, box,
                              elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_64B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_mla_decode_sm90_fp8(const MlaDecodeSm90Params& params, const void* kv_cache,
                                       int64_t num_pages, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  if (params.kv_scale == nullptr || kv_cache == nullptr || num_pages < 1) return cudaErrorInvalidValue;
  MlaDecodeSm90Params p = params;
  p.kv_codes = static_cast<const uint8_t*>(kv_cache);
  // At most 32 rows: the transposed register-widened consumers (16 or 32 columns), unless the
  // lockstep schedule is asked for (params.schedule = 0), which runs the 64-row consumers at every
  // row count, as it does above 32 rows.
  cudaError_t err;
  if (p.schedule != 0 && p.rows <= 32) {
    CUtensorMap map;
    err = make_fp8_map(&map, kv_cache, num_pages, p.page_size_log2);
    if (err == cudaSuccess) {
      err = p.rows <= 16 ? launch_decode<dev::kVariantFp8Regs16>(map, p, stream)
                         : launch_decode<dev::kVariantFp8Regs32>(map, p, stream);
    }
  } else {
    const CUtensorMap unused{};  // variant 2 reads the codes through params.kv_codes
    err = launch_decode<dev::kVariantFp8>(unused, p, stream);
  }
  if (err != cudaSuccess) return err;
  return launch_mla_decode_sm90_combine(p, stream);
}

}  // namespace tokenspeed::mla_sm90
