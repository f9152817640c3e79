// Validation of the MoE ops' arguments, shared by the CPU reference and kernels.
#pragma once

#include <optional>
#include <string>

#include "common/checks.h"

namespace tokenspeed {

// DeepSeek fp8 checkpoints scale weights in 128 x 128 blocks and activations per
// token in groups of 128 values.
constexpr int64_t kFp8BlockSize = 128;

inline void check_moe_route_args(const at::Tensor& logits, int64_t top_k,
                                 const std::string& scoring_func,
                                 const std::optional<at::Tensor>& correction_bias,
                                 int64_t n_group, int64_t topk_group) {
  constexpr const char* op = "moe_route";
  check_dtype(op, "router_logits", logits, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  check_rank(op, "router_logits", logits, 2, "[tokens, num_experts]");
  const int64_t experts = logits.size(1);
  TORCH_CHECK(scoring_func == "sigmoid" || scoring_func == "softmax", op,
              ": scoring_func must be \"sigmoid\" or \"softmax\", got \"", scoring_func, "\"");
  TORCH_CHECK(top_k >= 1 && top_k <= experts, op, ": top_k must be in [1, num_experts = ",
              experts, "], got ", top_k);
  TORCH_CHECK(n_group >= 1 && experts % n_group == 0, op, ": n_group (", n_group,
              ") must be >= 1 and divide num_experts (", experts, ")");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, op, ": topk_group must be in [1, n_group = ",
              n_group, "], got ", topk_group);
  TORCH_CHECK(top_k <= topk_group * (experts / n_group), op, ": top_k (", top_k,
              ") exceeds the experts in the selected groups (topk_group ", topk_group, " x ",
              experts / n_group, ")");
  if (correction_bias.has_value()) {
    check_dtype(op, "correction_bias", *correction_bias,
                {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
    check_same_device(op, "correction_bias", *correction_bias, logits, "router_logits");
    check_rank(op, "correction_bias", *correction_bias, 1, "[num_experts]");
    check_size(op, "correction_bias", *correction_bias, 0, experts, "num_experts");
  }
}

// Shape of a 128 x 128 block-scale tensor for a weight [E, rows, cols].
inline void check_block_scale(const char* op, const char* name, const at::Tensor& scale,
                              const at::Tensor& w) {
  check_dtype(op, name, scale, {at::kFloat});
  check_same_device(op, name, scale, w, "its weight");
  check_rank(op, name, scale, 3, "[experts, ceil(rows/128), ceil(cols/128)]");
  const int64_t rows = (w.size(1) + kFp8BlockSize - 1) / kFp8BlockSize;
  const int64_t cols = (w.size(2) + kFp8BlockSize - 1) / kFp8BlockSize;
  TORCH_CHECK(scale.size(0) == w.size(0) && scale.size(1) == rows && scale.size(2) == cols, op,
              ": ", name, " must have shape [", w.size(0), ", ", rows, ", ", cols,
              "] for a weight of shape ", w.sizes(), ", got ", scale.sizes());
}

inline void check_fused_moe_args(const at::Tensor& hidden, const at::Tensor& w13,
                                 const at::Tensor& w2, const at::Tensor& topk_weights,
                                 const at::Tensor& topk_ids,
                                 const std::optional<at::Tensor>& w13_scale,
                                 const std::optional<at::Tensor>& w2_scale,
                                 int64_t expert_offset) {
  constexpr const char* op = "fused_moe";
  check_dtype(op, "hidden_states", hidden, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  const bool fp8 = w13.scalar_type() == at::kFloat8_e4m3fn;
  if (fp8) {
    TORCH_CHECK(w2.scalar_type() == at::kFloat8_e4m3fn, op,
                ": w13 is float8_e4m3fn, so w2 must be too, got ", c10::toString(w2.scalar_type()));
    TORCH_CHECK(w13_scale.has_value() && w2_scale.has_value(), op,
                ": fp8 weights need w13_scale and w2_scale (float32 128x128 block scales)");
  } else {
    TORCH_CHECK(w13.scalar_type() == hidden.scalar_type() && w2.scalar_type() == hidden.scalar_type(),
                op, ": w13 and w2 must have hidden_states' dtype (",
                c10::toString(hidden.scalar_type()), ") or be float8_e4m3fn, got ",
                c10::toString(w13.scalar_type()), " and ", c10::toString(w2.scalar_type()));
    TORCH_CHECK(!w13_scale.has_value() && !w2_scale.has_value(), op,
                ": w13_scale / w2_scale are only meaningful with float8_e4m3fn weights");
  }
  check_dtype(op, "topk_weights", topk_weights, {at::kFloat});
  check_dtype(op, "topk_ids", topk_ids, {at::kInt});
  check_same_device(op, "w13", w13, hidden, "hidden_states");
  check_same_device(op, "w2", w2, hidden, "hidden_states");
  check_same_device(op, "topk_weights", topk_weights, hidden, "hidden_states");
  check_same_device(op, "topk_ids", topk_ids, hidden, "hidden_states");
  check_rank(op, "hidden_states", hidden, 2, "[tokens, hidden]");
  check_rank(op, "w13", w13, 3, "[local_experts, 2 * intermediate, hidden]");
  check_rank(op, "w2", w2, 3, "[local_experts, hidden, intermediate]");
  check_rank(op, "topk_weights", topk_weights, 2, "[tokens, top_k]");
  check_rank(op, "topk_ids", topk_ids, 2, "[tokens, top_k]");
  const int64_t hid = hidden.size(1);
  check_size(op, "w13", w13, 2, hid, "hidden, must equal hidden_states.shape[1]");
  TORCH_CHECK(w13.size(1) % 2 == 0, op, ": w13.shape[1] (gate and up stacked) must be even, got ",
              w13.size(1));
  check_size(op, "w2", w2, 0, w13.size(0), "local_experts, must equal w13.shape[0]");
  check_size(op, "w2", w2, 1, hid, "hidden, must equal hidden_states.shape[1]");
  check_size(op, "w2", w2, 2, w13.size(1) / 2, "intermediate, must equal w13.shape[1] / 2");
  TORCH_CHECK(topk_ids.sizes() == topk_weights.sizes(), op, ": topk_ids shape ",
              topk_ids.sizes(), " must equal topk_weights shape ", topk_weights.sizes());
  check_size(op, "topk_ids", topk_ids, 0, hidden.size(0), "tokens, must equal hidden_states.shape[0]");
  TORCH_CHECK(expert_offset >= 0, op, ": expert_offset must be >= 0, got ", expert_offset);
  if (fp8) {
    TORCH_CHECK(hid % kFp8BlockSize == 0 && w2.size(2) % kFp8BlockSize == 0, op,
                ": fp8 experts need hidden (", hid, ") and intermediate (", w2.size(2),
                ") to be multiples of 128 (activations are quantised in groups of 128)");
    check_block_scale(op, "w13_scale", *w13_scale, w13);
    check_block_scale(op, "w2_scale", *w2_scale, w2);
  }
}

}  // namespace tokenspeed
