// Launch interface of the merge_attn_states kernel (no torch types).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/cuda_types.cuh"

namespace tokenspeed {

struct MergeAttnStatesParams {
  const void* out_a;   // [rows, head_dim] partial output over key set A, dtype per DType
  const void* out_b;   // [rows, head_dim] partial output over key set B
  const float* lse_a;  // [rows] natural-log sum of exp over A; -inf = no keys
  const float* lse_b;  // [rows] likewise over B
  void* out;           // [rows, head_dim] merged output
  float* lse;          // [rows] merged lse
  int64_t rows;        // product of the leading dims (tokens x heads)
  int head_dim;        // values per row, contiguous
};

// vec_width: values per thread access (8 when head_dim % 8 == 0 and pointers are
// 16-byte aligned, else 1). Returns the launch error, if any.
cudaError_t launch_merge_attn_states(const MergeAttnStatesParams& params, DType dtype,
                                     int vec_width, int num_sms, cudaStream_t stream);

}  // namespace tokenspeed
