// Host side of the decode kernel's launch, shared by its translation units (bf16 and fp8
// caches): the one-time shared-memory opt-in per instantiation, and the launch itself.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include "common/sm90_host.h"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/decode/mla_decode_sm90_kernel.cuh"

namespace tokenspeed::mla_sm90 {

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
