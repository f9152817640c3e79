// Host side of the decode kernel's launch, shared by its translation units (bf16 and fp8
// caches): the TMA descriptor over the cache viewed as a 2-D [num_pages * page_size, 576]
// tensor, the one-time shared-memory opt-in per instantiation, and the launch itself.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "common/sm90_host.h"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_kernel.cuh"

namespace tokenspeed::mla_sm90 {

// A box is box_dims dims x min(page_size, 64) tokens (a box never crosses a page).
inline cudaError_t make_kv_map(CUtensorMap* map, const void* kv_cache, int64_t num_pages, int page_size_log2,
                               CUtensorMapDataType dtype, int elem_bytes, int box_dims, CUtensorMapSwizzle swizzle) {
  sm90::EncodeTiledFn encode = sm90::encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const int box_rows = 1 << (page_size_log2 < 6 ? page_size_log2 : 6);
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kHeadDim),
                              static_cast<cuuint64_t>(num_pages) << page_size_log2};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kHeadDim) * elem_bytes};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_dims), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult res = encode(map, dtype, 2, const_cast<void*>(kv_cache), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// One instantiation's launch; raises its dynamic shared memory limit above 48 KB once per
// device (the first call happens before any graph capture in practice: warm-up).
template <int kVariant>
cudaError_t launch_decode(const CUtensorMap& map, const MlaDecodeSm90Params& params, cudaStream_t stream) {
  static sm90::LargeSmemOptIn opt_in;
  const cudaError_t err = opt_in.ensure(reinterpret_cast<const void*>(&mla_decode_sm90_kernel<kVariant>), kSmemBytes);
  if (err != cudaSuccess) return err;
  mla_decode_sm90_kernel<kVariant><<<params.slots * params.m_blocks, kThreads, kSmemBytes, stream>>>(map, params);
  return cudaGetLastError();
}

}  // namespace tokenspeed::mla_sm90
