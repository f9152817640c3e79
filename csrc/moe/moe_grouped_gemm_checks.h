// Validation of tokenspeed::grouped_gemm's arguments, shared by the CPU reference and the
// sm90 kernel (which adds what it covers on top).
#pragma once

#include <optional>

#include "moe/moe_checks.h"

namespace tokenspeed {

inline void check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& w, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& a_scale,
                                    const std::optional<at::Tensor>& w_scale) {
  constexpr const char* op = "grouped_gemm";
  check_dtype(op, "a", a, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble, at::kFloat8_e4m3fn});
  check_dtype(op, "offsets", offsets, {at::kInt});
  check_same_device(op, "w", w, a, "a");
  check_same_device(op, "offsets", offsets, a, "a");
  check_rank(op, "a", a, 2, "[rows, k]");
  check_rank(op, "w", w, 3, "[groups, n, k]");
  check_rank(op, "offsets", offsets, 1, "[groups], cumulative row ends");
  check_size(op, "w", w, 2, a.size(1), "k, must equal a.shape[1]");
  check_size(op, "offsets", offsets, 0, w.size(0), "groups, must equal w.shape[0]");
  const bool fp8 = a.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(w.scalar_type() == a.scalar_type(), op, ": w must have a's dtype (", c10::toString(a.scalar_type()),
              "), got ", c10::toString(w.scalar_type()));
  if (!fp8) {
    TORCH_CHECK(!a_scale.has_value() && !w_scale.has_value(), op,
                ": a_scale / w_scale are only meaningful with float8_e4m3fn operands");
    return;
  }
  TORCH_CHECK(a_scale.has_value() && w_scale.has_value(), op,
              ": float8_e4m3fn operands need a_scale (float32 [rows, k/128]) and w_scale "
              "(float32 [groups, ceil(n/128), ceil(k/128)])");
  TORCH_CHECK(a.size(1) % kFp8BlockSize == 0, op, ": fp8 needs k (a.shape[1]) to be a multiple of 128, got ",
              a.size(1));
  check_dtype(op, "a_scale", *a_scale, {at::kFloat});
  check_same_device(op, "a_scale", *a_scale, a, "a");
  check_rank(op, "a_scale", *a_scale, 2, "[rows, k/128]");
  TORCH_CHECK(a_scale->size(0) == a.size(0) && a_scale->size(1) == a.size(1) / kFp8BlockSize, op,
              ": a_scale must have shape [", a.size(0), ", ", a.size(1) / kFp8BlockSize, "], got ", a_scale->sizes());
  check_block_scale(op, "w_scale", *w_scale, w);
}

}  // namespace tokenspeed
