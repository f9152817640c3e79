// Schema and CPU reference of tokenspeed::grouped_gemm: the GEMM of an MoE layer on its
// permuted rows, D[start_g:end_g] = A[start_g:end_g] @ W[g]^T for each group (expert) g.
//
// The schema lives here, in a TORCH_LIBRARY_FRAGMENT of its family, so the op exists in
// CPU-only builds too (the fake is registered from tokenspeed_kernels/backends/moe_sm90.py).
// offsets follow torch._grouped_mm: int32 cumulative row ends; they are made monotone
// (running maximum) and clamped to [0, rows]; rows at or past the last end are zero.
// fp8: a and w float8_e4m3fn, a_scale [rows, k/128] (per row, groups of 128 along k),
// w_scale [groups, ceil(n/128), ceil(k/128)] (128x128 blocks); the output is then bf16.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "moe/moe_grouped_gemm_checks.h"

namespace tokenspeed {
namespace {

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& w, const at::Tensor& offsets,
                            const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& w_scale) {
  check_grouped_gemm_args(a, w, offsets, a_scale, w_scale);
  const bool fp8 = a.scalar_type() == at::kFloat8_e4m3fn;
  const auto acc = a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto out_dtype = fp8 ? at::kBFloat16 : a.scalar_type();
  const int64_t rows = a.size(0), k = a.size(1), n = w.size(1);
  auto out = at::zeros({rows, n}, a.options().dtype(acc));
  auto ends = offsets.to(at::kLong).cpu();
  const auto* end_ptr = ends.data_ptr<int64_t>();
  int64_t start = 0, running = 0;
  for (int64_t g = 0; g < w.size(0); ++g) {
    running = std::max(running, end_ptr[g]);
    const int64_t end = std::clamp<int64_t>(running, start, rows);
    if (end > start) {
      auto x = a.slice(0, start, end).to(acc);
      at::Tensor wg;
      if (fp8) {
        x = x * a_scale->slice(0, start, end).to(acc).repeat_interleave(kFp8BlockSize, 1);
        auto s = (*w_scale)[g].to(acc).repeat_interleave(kFp8BlockSize, 0).slice(0, 0, n);
        s = s.repeat_interleave(kFp8BlockSize, 1).slice(1, 0, k);
        wg = w[g].to(acc) * s;
      } else {
        wg = w[g].to(acc);
      }
      out.slice(0, start, end).copy_(at::matmul(x, wg.t()));
    }
    start = end;
  }
  return out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenspeed, m) {
  // One grouped GEMM over expert-sorted rows (see the header comment); the sm90 MoE uses it.
  m.def(
      "grouped_gemm(Tensor a, Tensor w, Tensor offsets, Tensor? a_scale=None, Tensor? w_scale=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) { m.impl("grouped_gemm", &grouped_gemm_cpu); }

}  // namespace tokenspeed
