// The fp8-cache decode kernel's instantiations (mla_decode_sm90_fp8.cuh: 64-row lockstep consumers;
// mla_decode_sm90_transposed.cuh: the small-row consumer at 16 and 32 rows) and their host-side launch
// (no torch). Its producer reads the e4m3 codes itself (params.kv_codes), so no TMA descriptor is
// encoded: the kernel's descriptor argument is left empty and never used.
#include <cuda.h>
#include <cuda_runtime.h>

#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_launch.cuh"

namespace tokenspeed::mla_sm90 {

cudaError_t launch_mla_decode_sm90_fp8(const MlaDecodeSm90Params& params, const void* kv_cache,
                                       int64_t num_pages, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  if (params.kv_scale == nullptr || kv_cache == nullptr || num_pages < 1) return cudaErrorInvalidValue;
  MlaDecodeSm90Params p = params;
  p.kv_codes = static_cast<const uint8_t*>(kv_cache);
  const CUtensorMap unused{};
  // At most 32 rows: the transposed consumer (no padded rows), unless the lockstep schedule is
  // asked for (params.schedule = 0), which runs the 64-row consumers at every row count.
  const bool transposed = p.schedule != 0 && p.rows <= 32;
  const cudaError_t err = !transposed     ? launch_decode<dev::kVariantFp8>(unused, p, stream)
                          : p.rows <= 16  ? launch_decode<dev::kVariantFp8Rows16>(unused, p, stream)
                                          : launch_decode<dev::kVariantFp8Rows32>(unused, p, stream);
  if (err != cudaSuccess) return err;
  return launch_mla_decode_sm90_combine(p, stream);
}

}  // namespace tokenspeed::mla_sm90
