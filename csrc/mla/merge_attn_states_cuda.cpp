// CUDA launcher of tokenspeed::merge_attn_states: validate, allocate, launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/torch.h>

#include "common/cuda_launch.h"
#include "mla/merge_attn_states.h"
#include "mla/mla_checks.h"

namespace tokenspeed {
namespace {

std::tuple<at::Tensor, at::Tensor> merge_attn_states_cuda(const at::Tensor& out_a,
                                                          const at::Tensor& lse_a,
                                                          const at::Tensor& out_b,
                                                          const at::Tensor& lse_b) {
  constexpr const char* op = "merge_attn_states";
  check_merge_attn_states_args(out_a, lse_a, out_b, lse_b);
  TORCH_CHECK(out_a.scalar_type() != at::kDouble, op,
              ": the CUDA kernel takes bfloat16/half/float outputs, got Double");
  for (const auto* t : {&out_a, &lse_a, &out_b, &lse_b}) {
    TORCH_CHECK(t->is_contiguous(), op, ": CUDA inputs must be contiguous (got strides ",
                t->strides(), " for a tensor of shape ", t->sizes(), ")");
  }
  const c10::cuda::CUDAGuard guard(out_a.device());
  auto out = at::empty_like(out_a);
  auto lse = at::empty_like(lse_a);
  MergeAttnStatesParams p{};
  p.out_a = out_a.data_ptr();
  p.out_b = out_b.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.lse_b = lse_b.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.head_dim = static_cast<int>(out_a.size(-1));
  p.rows = p.head_dim == 0 ? 0 : out_a.numel() / p.head_dim;
  const int vec = (p.head_dim % 8 == 0 && aligned16(p.out_a) && aligned16(p.out_b) &&
                   aligned16(p.out) && out_a.element_size() == 2)
                      ? 8
                      : 1;
  check_cuda_launch(op, launch_merge_attn_states(p, to_dtype_tag(op, out_a), vec,
                                                 num_sms(out_a.device()),
                                                 at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) { m.impl("merge_attn_states", &merge_attn_states_cuda); }

}  // namespace tokenspeed
