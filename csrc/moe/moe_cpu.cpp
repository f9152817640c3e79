// CPU reference of tokenspeed::moe_route and tokenspeed::fused_moe.
#include <torch/torch.h>

#include <limits>

#include "moe/moe_checks.h"

namespace tokenspeed {
namespace {

// Indices of the k largest values along the last dim, largest first; equal
// values keep the lower index first (a stable descending sort), the tie rule
// every backend follows.
at::Tensor topk_stable(const at::Tensor& x, int64_t k) {
  auto sorted = at::sort(x, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
  return std::get<1>(sorted).slice(-1, 0, k);
}

// DeepSeek-V3 routing: sigmoid scores; the bias only steers which experts are
// chosen (weights come from the unbiased scores); with n_group > 1 only experts
// of the topk_group best groups compete (a group's score is the sum of its top
// two biased scores, or its max score when there is no bias).
std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits, int64_t top_k,
                                                 c10::string_view scoring_func_view,
                                                 const std::optional<at::Tensor>& correction_bias,
                                                 int64_t n_group, int64_t topk_group,
                                                 bool renormalize, double routed_scaling_factor) {
  const std::string scoring_func(scoring_func_view);
  check_moe_route_args(logits, top_k, scoring_func, correction_bias, n_group, topk_group);
  const int64_t tokens = logits.size(0), experts = logits.size(1);
  auto x = logits.to(at::kFloat);
  auto scores = scoring_func == "sigmoid" ? at::sigmoid(x) : at::softmax(x, -1);
  auto choice = correction_bias.has_value() ? scores + correction_bias->to(at::kFloat) : scores;
  if (n_group > 1) {
    auto grouped = choice.view({tokens, n_group, experts / n_group});
    at::Tensor group_scores;
    if (correction_bias.has_value()) {
      const int64_t two = std::min<int64_t>(2, experts / n_group);
      group_scores = std::get<0>(at::sort(grouped, -1, /*descending=*/true)).slice(-1, 0, two).sum(-1);
    } else {
      group_scores = std::get<0>(grouped.max(-1));
    }
    auto keep_groups = topk_stable(group_scores, topk_group);
    auto group_mask = at::zeros({tokens, n_group}, choice.options().dtype(at::kBool))
                          .scatter_(1, keep_groups, true);
    auto expert_mask = group_mask.unsqueeze(-1).expand({tokens, n_group, experts / n_group})
                           .reshape({tokens, experts});
    choice = choice.masked_fill(expert_mask.logical_not(), -std::numeric_limits<float>::infinity());
  }
  auto ids = topk_stable(choice, top_k);
  auto weights = scores.gather(1, ids);
  if (renormalize) weights = weights / (weights.sum(-1, /*keepdim=*/true) + 1e-20);
  weights = weights * routed_scaling_factor;
  return {weights.contiguous(), ids.to(at::kInt).contiguous()};
}

// Per-token, per-128-group e4m3 quantisation round trip: what the fp8 GEMM sees.
at::Tensor fp8_quant_dequant_activation(const at::Tensor& x) {
  constexpr double kE4m3Max = 448.0;
  auto groups = x.view({x.size(0), -1, kFp8BlockSize});
  auto scale = groups.abs().amax(-1, /*keepdim=*/true).clamp_min(1e-10) / kE4m3Max;
  auto q = (groups / scale).clamp(-kE4m3Max, kE4m3Max).to(at::kFloat8_e4m3fn);
  return (q.to(x.scalar_type()) * scale).view_as(x);
}

// Dequantises one expert's fp8 weight [rows, cols] with its [ceil(rows/128), ceil(cols/128)] scales.
at::Tensor dequant_block_fp8(const at::Tensor& w, const at::Tensor& scale, at::ScalarType acc) {
  auto s = scale.to(acc)
               .repeat_interleave(kFp8BlockSize, 0)
               .slice(0, 0, w.size(0))
               .repeat_interleave(kFp8BlockSize, 1)
               .slice(1, 0, w.size(1));
  return w.to(acc) * s;
}

// For each token: sum over its top-k of weight * down(silu(gate(x)) * up(x)).
// Experts outside [expert_offset, expert_offset + local_experts) belong to other
// ranks and contribute nothing. The SiLU-and-mul intermediate is materialised
// in the activation dtype (as the kernels store it), accumulation in fp32/fp64.
at::Tensor fused_moe_cpu(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                         const std::optional<at::Tensor>& w13_scale,
                         const std::optional<at::Tensor>& w2_scale, int64_t expert_offset) {
  check_fused_moe_args(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
                       expert_offset);
  const bool fp8 = w13.scalar_type() == at::kFloat8_e4m3fn;
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t inter = w2.size(2);
  auto out = at::zeros({hidden.size(0), hidden.size(1)}, hidden.options().dtype(acc));
  auto ids = topk_ids.to(at::kLong) - expert_offset;
  for (int64_t e = 0; e < w13.size(0); ++e) {
    auto hit = (ids == e).nonzero();  // [n, 2]: (token, slot)
    if (hit.size(0) == 0) continue;
    auto tok = hit.select(1, 0), slot = hit.select(1, 1);
    auto x = hidden.index_select(0, tok).to(acc);
    if (fp8) x = fp8_quant_dequant_activation(x);
    auto wg = fp8 ? dequant_block_fp8(w13[e], (*w13_scale)[e], acc) : w13[e].to(acc);
    auto gate_up = at::matmul(x, wg.t());
    auto act = (at::silu(gate_up.slice(1, 0, inter)) * gate_up.slice(1, inter, 2 * inter))
                   .to(hidden.scalar_type())
                   .to(acc);
    if (fp8) act = fp8_quant_dequant_activation(act);
    auto wd = fp8 ? dequant_block_fp8(w2[e], (*w2_scale)[e], acc) : w2[e].to(acc);
    auto y = at::matmul(act, wd.t());
    auto w = topk_weights.index({tok, slot}).to(acc).unsqueeze(1);
    out.index_add_(0, tok, y * w);
  }
  return out.to(hidden.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("fused_moe", &fused_moe_cpu);
}

}  // namespace tokenspeed
