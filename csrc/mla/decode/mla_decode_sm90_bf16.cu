// The bf16 decode kernel's instantiations (lockstep and seesaw schedules) and their host-side
// launch (no torch): encodes the TMA descriptor over the cache, launches decode then combine.
// Page size is a run-time parameter (it only changes the producer's box size), so one compiled
// kernel per schedule serves every supported page size.
#include <cuda.h>
#include <cuda_runtime.h>

#include "common/sm90_host.h"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_launch.cuh"

namespace tokenspeed::mla_sm90 {
namespace {

using sm90::encode_tiled;
using sm90::EncodeTiledFn;

// The cache viewed as a 2-D [num_pages * page_size, 576] bf16 tensor; a box is 64
// dims x min(page_size, 64) tokens, 128-byte swizzled (one smem panel or part of one).
cudaError_t make_kv_map(CUtensorMap* map, const void* kv_cache, int64_t num_pages, int page_size_log2) {
  EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const int box_rows = 1 << (page_size_log2 < 6 ? page_size_log2 : 6);
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kHeadDim),
                              static_cast<cuuint64_t>(num_pages) << page_size_log2};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kHeadDim) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult res = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(kv_cache), dims,
                              strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace

size_t decode_smem_bytes() { return static_cast<size_t>(kSmemBytes); }

// The two consumer schedules are separate instantiations: a run-time branch between them in one
// kernel cost the lockstep schedule ~12% at 128 heads (register allocation over both paths).
cudaError_t launch_mla_decode_sm90(const MlaDecodeSm90Params& params, const void* kv_cache,
                                   int64_t num_pages, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  CUtensorMap map;
  cudaError_t err = make_kv_map(&map, kv_cache, num_pages, params.page_size_log2);
  if (err != cudaSuccess) return err;
  err = params.schedule == 1 ? launch_decode<dev::kVariantSeesaw>(map, params, stream)
                             : launch_decode<dev::kVariantLockstep>(map, params, stream);
  if (err != cudaSuccess) return err;
  return launch_mla_decode_sm90_combine(params, stream);
}

}  // namespace tokenspeed::mla_sm90
