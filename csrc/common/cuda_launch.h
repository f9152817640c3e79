// Host-side helpers for CUDA launchers (torch headers allowed here, not in .cu).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>
#include <torch/types.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <strings.h>  // strcasecmp

#include "common/cuda_types.cuh"

namespace tokenspeed {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline DType to_dtype_tag(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return DType::kBF16;
    case at::kHalf: return DType::kFP16;
    case at::kFloat: return DType::kFP32;
    default:
      TORCH_CHECK(false, op, ": no CUDA kernel for dtype ", c10::toString(t.scalar_type()));
  }
}

inline int num_sms(const at::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
}

// Kernels that use sm_90a instructions (wgmma, TMA) refuse other GPUs by name.
// Suffix of every error a cuda_sm90 kernel raises for a case it does not cover (the case is
// valid: another backend runs it).
constexpr const char* kSm90UseRegistry =
    "; the cuda_sm90 kernel does not cover this case: select the triton or reference backend "
    "through tokenspeed_kernels.registry";

inline void check_sm90(const char* op, const at::Device& device) {
  const auto* prop = at::cuda::getDeviceProperties(device.index());
  TORCH_CHECK(prop->major == 9, op, ": this kernel needs a Hopper GPU (compute capability 9.x), ",
              "but ", prop->name, " is ", prop->major, ".", prop->minor,
              "; select another backend through tokenspeed_kernels.registry");
}

inline void check_cuda_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// TOKENSPEED_DEBUG_CHECKS (tokenspeed_kernels/env.py): value checks that need a device
// sync (e.g. cache_seqlens against the block table), off by default: graph capture forbids them.
// Same spellings as tokenspeed_kernels.env.flag: 1/true/yes/on, any case.
inline bool debug_checks() {
  const char* v = std::getenv("TOKENSPEED_DEBUG_CHECKS");
  return v != nullptr && (std::strcmp(v, "1") == 0 || strcasecmp(v, "true") == 0 ||
                          strcasecmp(v, "yes") == 0 || strcasecmp(v, "on") == 0);
}

}  // namespace tokenspeed
