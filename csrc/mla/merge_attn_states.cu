// merge_attn_states: out = (wa * out_a + wb * out_b) / (wa + wb), wa = exp(lse_a - m).
// Memory-bound: each thread moves VEC values of each input as one aligned access.
#include <cmath>

#include "mla/merge_attn_states.h"

namespace tokenspeed {
namespace {

template <typename T, int VEC>
__global__ void merge_attn_states_kernel(MergeAttnStatesParams p) {
  const int64_t chunks_per_row = p.head_dim / VEC;
  const int64_t total = p.rows * chunks_per_row;
  const auto* a = static_cast<const Vec<T, VEC>*>(p.out_a);
  const auto* b = static_cast<const Vec<T, VEC>*>(p.out_b);
  auto* o = static_cast<Vec<T, VEC>*>(p.out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / chunks_per_row;
    const float la = p.lse_a[row], lb = p.lse_b[row];
    // Both sides empty: m = -inf; shift by 0 so the weights are exp(-inf) = 0.
    const float m = fmaxf(la, lb);
    const float shift = isinf(m) ? 0.f : m;
    const float wa = expf(la - shift), wb = expf(lb - shift);
    const float sum = wa + wb;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const Vec<T, VEC> va = a[i], vb = b[i];
    Vec<T, VEC> vo;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      vo.v[j] = from_float<T>((to_float(va.v[j]) * wa + to_float(vb.v[j]) * wb) * inv);
    }
    o[i] = vo;
    if (i % chunks_per_row == 0) p.lse[row] = shift + logf(sum);  // logf(0) = -inf
  }
}

template <typename T>
cudaError_t launch_typed(const MergeAttnStatesParams& p, int vec, int num_sms, cudaStream_t s) {
  constexpr int kThreads = 256;
  const int64_t total = p.rows * (p.head_dim / vec);
  if (total == 0) return cudaSuccess;
  // Enough blocks to cover every SM several times; the grid-stride loop does the rest.
  const int64_t want = (total + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < num_sms * 8LL ? want : num_sms * 8LL);
  if (vec == 8) {
    merge_attn_states_kernel<T, 8><<<blocks, kThreads, 0, s>>>(p);
  } else {
    merge_attn_states_kernel<T, 1><<<blocks, kThreads, 0, s>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_merge_attn_states(const MergeAttnStatesParams& params, DType dtype,
                                     int vec_width, int num_sms, cudaStream_t stream) {
  switch (dtype) {
    case DType::kBF16: return launch_typed<__nv_bfloat16>(params, vec_width, num_sms, stream);
    case DType::kFP16: return launch_typed<__half>(params, vec_width, num_sms, stream);
    case DType::kFP32: return launch_typed<float>(params, vec_width, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tokenspeed
