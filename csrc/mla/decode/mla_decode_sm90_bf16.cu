// The bf16 decode kernel's instantiations (lockstep and seesaw schedules) and their host-side
// launch (no torch): encodes the TMA descriptor over the cache, launches decode then combine.
// Page size is a run-time parameter (it only changes the producer's box size), so one compiled
// kernel per schedule serves every supported page size.
#include <cuda.h>
#include <cuda_runtime.h>

#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_launch.cuh"

namespace tokenspeed::mla_sm90 {

size_t decode_smem_bytes() { return static_cast<size_t>(kSmemBytes); }

// The two consumer schedules are separate instantiations: a run-time branch between them in one
// kernel cost the lockstep schedule ~12% at 128 heads (register allocation over both paths).
cudaError_t launch_mla_decode_sm90(const MlaDecodeSm90Params& params, const void* kv_cache,
                                   int64_t num_pages, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  CUtensorMap map;
  // bf16 boxes of 64 dims: one 128-byte-swizzled smem panel (or part of one).
  cudaError_t err = make_kv_map(&map, kv_cache, num_pages, params.page_size_log2, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                                2, 64, CU_TENSOR_MAP_SWIZZLE_128B);
  if (err != cudaSuccess) return err;
  err = params.schedule == 1 ? launch_decode<dev::kVariantSeesaw>(map, params, stream)
                             : launch_decode<dev::kVariantLockstep>(map, params, stream);
  if (err != cudaSuccess) return err;
  return launch_mla_decode_sm90_combine(params, stream);
}

}  // namespace tokenspeed::mla_sm90
