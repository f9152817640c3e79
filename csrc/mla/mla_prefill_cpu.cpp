// CPU reference of tokenspeed::mla_prefill (ragged, non-absorbed attention).
//
// Sequence b has q tokens cu_seqlens_q[b]..cu_seqlens_q[b+1] and kv tokens
// cu_seqlens_k[b]..cu_seqlens_k[b+1]. Causal is bottom-right aligned: the last
// query sees every key, query i of lq sees keys j <= lk - lq + i. Query head h
// reads kv head h / (heads / kv_heads). lse is [total_q, heads], natural log.
#include <torch/torch.h>

#include <limits>

#include "mla/mla_checks.h"

namespace tokenspeed {
namespace {

std::tuple<at::Tensor, at::Tensor> mla_prefill_cpu(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v,
                                                   const at::Tensor& cu_seqlens_q,
                                                   const at::Tensor& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                   double softmax_scale, bool causal) {
  constexpr const char* op = "mla_prefill";
  check_mla_prefill_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale);
  check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.size(0), max_seqlen_q, "max_seqlen_q");
  check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.size(0), max_seqlen_k, "max_seqlen_k");

  const int64_t heads = q.size(1), kv_heads = k.size(1), dim_v = v.size(2);
  const int64_t group = heads / kv_heads;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::zeros({q.size(0), heads, dim_v}, q.options());
  auto lse = at::full({q.size(0), heads}, -std::numeric_limits<float>::infinity(),
                      q.options().dtype(at::kFloat));
  auto cq = cu_seqlens_q.accessor<int32_t, 1>();
  auto ck = cu_seqlens_k.accessor<int32_t, 1>();
  for (int64_t b = 0; b + 1 < cu_seqlens_q.size(0); ++b) {
    const int64_t lq = cq[b + 1] - cq[b], lk = ck[b + 1] - ck[b];
    if (lq == 0 || lk == 0) continue;
    // [heads, lq, d] x [heads, d, lk]: kv heads repeated for grouped queries.
    auto qb = q.slice(0, cq[b], cq[b + 1]).to(acc).transpose(0, 1);
    auto kb = k.slice(0, ck[b], ck[b + 1]).to(acc).repeat_interleave(group, 1).transpose(0, 1);
    auto vb = v.slice(0, ck[b], ck[b + 1]).to(acc).repeat_interleave(group, 1).transpose(0, 1);
    auto scores = at::matmul(qb, kb.transpose(1, 2)) * softmax_scale;  // [heads, lq, lk]
    if (causal) {
      auto key = at::arange(lk, scores.options().dtype(at::kLong)).unsqueeze(0);
      auto qi = at::arange(lq, key.options()).unsqueeze(1);
      scores = scores.masked_fill(key > (qi + (lk - lq)), -std::numeric_limits<double>::infinity());
    }
    auto row_lse = at::logsumexp(scores, -1, /*keepdim=*/true);
    auto probs = at::where(at::isfinite(row_lse), at::exp(scores - row_lse), at::zeros_like(scores));
    auto ob = at::matmul(probs, vb);  // [heads, lq, dim_v]
    out.slice(0, cq[b], cq[b + 1]).copy_(ob.transpose(0, 1));
    lse.slice(0, cq[b], cq[b + 1]).copy_(row_lse.squeeze(-1).transpose(0, 1));
  }
  return {out, lse};
}

// Weights each partial result by exp(lse - max); a side with lse = -inf (no
// keys) contributes nothing; both -inf gives out = 0, lse = -inf.
std::tuple<at::Tensor, at::Tensor> merge_attn_states_cpu(const at::Tensor& out_a,
                                                         const at::Tensor& lse_a,
                                                         const at::Tensor& out_b,
                                                         const at::Tensor& lse_b) {
  check_merge_attn_states_args(out_a, lse_a, out_b, lse_b);
  const auto acc = out_a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto la = lse_a.to(acc), lb = lse_b.to(acc);
  auto m = at::maximum(la, lb);
  auto m_safe = at::where(at::isfinite(m), m, at::zeros_like(m));
  auto wa = at::exp(la - m_safe), wb = at::exp(lb - m_safe);
  auto total = wa + wb;
  auto denom = at::where(total > 0, total, at::ones_like(total));
  auto out = (out_a.to(acc) * (wa / denom).unsqueeze(-1) + out_b.to(acc) * (wb / denom).unsqueeze(-1));
  auto lse = m_safe + at::log(total);  // log(0) = -inf for rows with no keys on either side
  return {out.to(out_a.scalar_type()), lse.to(at::kFloat)};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenspeed, CPU, m) {
  m.impl("mla_prefill", &mla_prefill_cpu);
  m.impl("merge_attn_states", &merge_attn_states_cpu);
}

}  // namespace tokenspeed
