// CPU reference of tokenspeed::mla_decode: the exact semantics every backend matches.
//
// Rows of one sequence are (query position i, head h); query i of q_len new
// tokens sits at absolute position L - q_len + i, where L = cache_seqlens[b]
// already counts the new tokens. Causal (bottom-right aligned): query i sees
// keys 0 .. L - q_len + i. A row that sees no key returns out = 0, lse = -inf.
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "mla/mla_checks.h"

namespace tokenspeed {
namespace {

std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(const at::Tensor& q, const at::Tensor& kv_cache,
                                                  const at::Tensor& block_table,
                                                  const at::Tensor& cache_seqlens,
                                                  double softmax_scale, bool causal,
                                                  int64_t head_dim_v,
                                                  const std::optional<at::Tensor>& kv_scale) {
  check_mla_decode_args(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v,
                        kv_scale);
  const int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t num_pages = kv_cache.size(0), page_size = kv_cache.size(1);
  check_mla_decode_lengths(block_table, cache_seqlens, num_pages, page_size);

  // Accumulate in float64 for float64 inputs, float32 otherwise.
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({batch, q_len, heads, head_dim_v}, q.options());
  auto lse = at::full({batch, q_len, heads}, -std::numeric_limits<float>::infinity(),
                      q.options().dtype(at::kFloat));
  auto lens = cache_seqlens.accessor<int32_t, 1>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lens[b];
    if (len == 0) continue;
    const int64_t used_pages = (len + page_size - 1) / page_size;
    auto pages = block_table[b].slice(0, 0, used_pages).to(at::kLong);
    auto kv = kv_cache.index_select(0, pages).reshape({-1, dim}).slice(0, 0, len).to(acc);
    if (kv_scale.has_value()) kv = kv * kv_scale->to(acc);
    auto qb = q[b].reshape({q_len * heads, dim}).to(acc);  // row = i * heads + h
    auto scores = at::matmul(qb, kv.t()) * softmax_scale;  // [q_len*heads, len]
    if (causal) {
      // Query i may see key j iff j <= len - q_len + i.
      auto key = at::arange(len, scores.options().dtype(at::kLong)).unsqueeze(0);
      auto qi = at::arange(q_len, key.options()).repeat_interleave(heads).unsqueeze(1);
      scores = scores.masked_fill(key > (qi + (len - q_len)),
                                  -std::numeric_limits<double>::infinity());
    }
    auto row_lse = at::logsumexp(scores, -1, /*keepdim=*/true);
    auto seen = at::isfinite(row_lse);
    auto probs = at::where(seen, at::exp(scores - row_lse), at::zeros_like(scores));
    auto ob = at::matmul(probs, kv.slice(1, 0, head_dim_v));
    out[b].copy_(ob.reshape({q_len, heads, head_dim_v}));
    lse[b].copy_(row_lse.reshape({q_len, heads}));
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) { m.impl("mla_decode", &mla_decode_cpu); }

}  // namespace tokenspeed
