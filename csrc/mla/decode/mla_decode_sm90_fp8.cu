// The fp8-cache decode kernel's instantiation (mla_decode_sm90_fp8.cuh) and its host-side launch
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
  const cudaError_t err = launch_decode<dev::kVariantFp8>(unused, p, stream);
  if (err != cudaSuccess) return err;
  return launch_mla_decode_sm90_combine(p, stream);
}

}  // namespace tokenspeed::mla_sm90
