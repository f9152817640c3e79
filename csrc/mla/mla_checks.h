// Validation of the MLA ops' arguments, shared by the CPU reference and the CUDA
// launchers so every backend reports bad input the same way.
#pragma once

#include <optional>

#include "common/checks.h"

namespace tokenspeed {

// Checks dtype, device, rank and shape agreement of mla_decode's arguments.
// Length-versus-block-table checks need the values of cache_seqlens; they are
// in check_mla_decode_lengths (host tensors only, so no device sync here).
inline void check_mla_decode_args(const at::Tensor& q, const at::Tensor& kv_cache,
                                  const at::Tensor& block_table,
                                  const at::Tensor& cache_seqlens, double softmax_scale,
                                  int64_t head_dim_v, const std::optional<at::Tensor>& kv_scale) {
  constexpr const char* op = "mla_decode";
  check_dtype(op, "q", q, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  const bool fp8_kv = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  if (fp8_kv) {
    TORCH_CHECK(kv_scale.has_value(), op,
                ": kv_cache is float8_e4m3fn, so kv_scale (float32 [1]) is required");
    TORCH_CHECK(q.scalar_type() != at::kDouble, op,
                ": q must be bfloat16/half/float with an fp8 kv_cache, got Double");
  } else {
    TORCH_CHECK(kv_cache.scalar_type() == q.scalar_type(), op, ": kv_cache dtype (",
                c10::toString(kv_cache.scalar_type()), ") must equal q dtype (",
                c10::toString(q.scalar_type()), ") or be float8_e4m3fn");
    TORCH_CHECK(!kv_scale.has_value(), op,
                ": kv_scale is only meaningful with a float8_e4m3fn kv_cache");
  }
  check_dtype(op, "block_table", block_table, {at::kInt});
  check_dtype(op, "cache_seqlens", cache_seqlens, {at::kInt});
  check_same_device(op, "kv_cache", kv_cache, q, "q");
  check_same_device(op, "block_table", block_table, q, "q");
  check_same_device(op, "cache_seqlens", cache_seqlens, q, "q");

  check_rank(op, "q", q, 4, "[batch, q_len, heads, head_dim]");
  check_rank(op, "kv_cache", kv_cache, 3, "[num_pages, page_size, head_dim]");
  check_rank(op, "block_table", block_table, 2, "[batch, max_pages_per_seq]");
  check_rank(op, "cache_seqlens", cache_seqlens, 1, "[batch]");
  const int64_t batch = q.size(0);
  TORCH_CHECK(q.size(1) >= 1, op, ": q_len (q.shape[1]) must be >= 1, got ", q.size(1));
  TORCH_CHECK(q.size(2) >= 1, op, ": heads (q.shape[2]) must be >= 1, got ", q.size(2));
  check_size(op, "kv_cache", kv_cache, 2, q.size(3), "head_dim, must equal q.shape[3]");
  TORCH_CHECK(kv_cache.size(1) >= 1, op, ": page_size (kv_cache.shape[1]) must be >= 1");
  check_size(op, "block_table", block_table, 0, batch, "batch, must equal q.shape[0]");
  check_size(op, "cache_seqlens", cache_seqlens, 0, batch, "batch, must equal q.shape[0]");
  TORCH_CHECK(head_dim_v >= 1 && head_dim_v <= q.size(3), op, ": head_dim_v must be in [1, ",
              q.size(3), "] (the value part is the first head_dim_v of head_dim), got ",
              head_dim_v);
  TORCH_CHECK(std::isfinite(softmax_scale), op, ": softmax_scale must be finite, got ",
              softmax_scale);
  check_last_dim_contiguous(op, "q", q);
  TORCH_CHECK(kv_cache.is_contiguous(), op, ": kv_cache must be contiguous");
  TORCH_CHECK(block_table.stride(1) == 1, op, ": block_table must be contiguous per row");
  if (kv_scale.has_value()) {
    check_dtype(op, "kv_scale", *kv_scale, {at::kFloat});
    check_same_device(op, "kv_scale", *kv_scale, q, "q");
    TORCH_CHECK(kv_scale->numel() == 1, op, ": kv_scale must hold one per-tensor scale, got ",
                kv_scale->numel(), " values");
  }
}

// Checks each sequence length against the block table and each used page index
// against the cache. Needs host-visible tensors (the CPU backend, or a debug mode).
inline void check_mla_decode_lengths(const at::Tensor& block_table_cpu,
                                     const at::Tensor& cache_seqlens_cpu, int64_t num_pages,
                                     int64_t page_size) {
  constexpr const char* op = "mla_decode";
  auto lens = cache_seqlens_cpu.accessor<int32_t, 1>();
  auto table = block_table_cpu.accessor<int32_t, 2>();
  const int64_t capacity = block_table_cpu.size(1) * page_size;
  for (int64_t b = 0; b < cache_seqlens_cpu.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 0, op, ": cache_seqlens[", b, "] is negative (", lens[b], ")");
    TORCH_CHECK(lens[b] <= capacity, op, ": cache_seqlens[", b, "] = ", lens[b],
                " exceeds the block table's capacity (", block_table_cpu.size(1),
                " pages x page_size ", page_size, " = ", capacity, ")");
    const int64_t used_pages = (lens[b] + page_size - 1) / page_size;
    for (int64_t p = 0; p < used_pages; ++p) {
      TORCH_CHECK(table[b][p] >= 0 && table[b][p] < num_pages, op, ": block_table[", b, ", ",
                  p, "] = ", table[b][p], " is not a page of kv_cache (num_pages ", num_pages,
                  ")");
    }
  }
}

}  // namespace tokenspeed

namespace tokenspeed {

// Checks mla_prefill's arguments: ragged q [Tq, H, Dqk], k [Tk, Hk, Dqk],
// v [Tk, Hk, Dv] with H a multiple of Hk, cumulative lengths int32 [batch + 1].
inline void check_mla_prefill_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                   int64_t max_seqlen_q, int64_t max_seqlen_k,
                                   double softmax_scale) {
  constexpr const char* op = "mla_prefill";
  check_dtype(op, "q", q, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", c10::toString(q.scalar_type()), ", ",
              c10::toString(k.scalar_type()), ", ", c10::toString(v.scalar_type()));
  check_dtype(op, "cu_seqlens_q", cu_seqlens_q, {at::kInt});
  check_dtype(op, "cu_seqlens_k", cu_seqlens_k, {at::kInt});
  check_same_device(op, "k", k, q, "q");
  check_same_device(op, "v", v, q, "q");
  check_same_device(op, "cu_seqlens_q", cu_seqlens_q, q, "q");
  check_same_device(op, "cu_seqlens_k", cu_seqlens_k, q, "q");
  check_rank(op, "q", q, 3, "[total_q, heads, head_dim_qk]");
  check_rank(op, "k", k, 3, "[total_k, kv_heads, head_dim_qk]");
  check_rank(op, "v", v, 3, "[total_k, kv_heads, head_dim_v]");
  check_rank(op, "cu_seqlens_q", cu_seqlens_q, 1, "[batch + 1]");
  check_rank(op, "cu_seqlens_k", cu_seqlens_k, 1, "[batch + 1]");
  check_size(op, "k", k, 2, q.size(2), "head_dim_qk, must equal q.shape[2]");
  check_size(op, "v", v, 0, k.size(0), "total_k, must equal k.shape[0]");
  check_size(op, "v", v, 1, k.size(1), "kv_heads, must equal k.shape[1]");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": heads (q.shape[1] = ",
              q.size(1), ") must be a multiple of kv_heads (k.shape[1] = ", k.size(1), ")");
  TORCH_CHECK(cu_seqlens_q.size(0) >= 1, op, ": cu_seqlens_q must hold batch + 1 >= 1 values");
  check_size(op, "cu_seqlens_k", cu_seqlens_k, 0, cu_seqlens_q.size(0),
             "batch + 1, must equal cu_seqlens_q.shape[0]");
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op,
              ": max_seqlen_q and max_seqlen_k must be >= 0, got ", max_seqlen_q, " and ",
              max_seqlen_k);
  TORCH_CHECK(std::isfinite(softmax_scale), op, ": softmax_scale must be finite");
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);
}

// Checks the cumulative lengths' values (host tensors only).
inline void check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu_cpu,
                             int64_t total, int64_t max_seqlen, const char* max_name) {
  auto cu = cu_cpu.accessor<int32_t, 1>();
  TORCH_CHECK(cu[0] == 0, op, ": ", name, "[0] must be 0, got ", cu[0]);
  for (int64_t i = 1; i < cu_cpu.size(0); ++i) {
    const int64_t len = cu[i] - cu[i - 1];
    TORCH_CHECK(len >= 0, op, ": ", name, " must be non-decreasing, but ", name, "[", i,
                "] = ", cu[i], " < ", name, "[", i - 1, "] = ", cu[i - 1]);
    TORCH_CHECK(len <= max_seqlen, op, ": sequence ", i - 1, " has length ", len,
                " > ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK(cu[cu_cpu.size(0) - 1] == total, op, ": ", name, "[-1] = ",
              cu[cu_cpu.size(0) - 1], " must equal the number of tokens (", total, ")");
}

// merge_attn_states: two results over disjoint keys, out [..., D], lse [...].
inline void check_merge_attn_states_args(const at::Tensor& out_a, const at::Tensor& lse_a,
                                         const at::Tensor& out_b, const at::Tensor& lse_b) {
  constexpr const char* op = "merge_attn_states";
  check_dtype(op, "out_a", out_a, {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  TORCH_CHECK(out_b.scalar_type() == out_a.scalar_type(), op,
              ": out_b dtype must equal out_a dtype (", c10::toString(out_a.scalar_type()),
              "), got ", c10::toString(out_b.scalar_type()));
  check_dtype(op, "lse_a", lse_a, {at::kFloat});
  check_dtype(op, "lse_b", lse_b, {at::kFloat});
  check_same_device(op, "lse_a", lse_a, out_a, "out_a");
  check_same_device(op, "out_b", out_b, out_a, "out_a");
  check_same_device(op, "lse_b", lse_b, out_a, "out_a");
  TORCH_CHECK(out_a.dim() >= 1, op, ": out_a must have rank >= 1 ([..., head_dim])");
  TORCH_CHECK(out_b.sizes() == out_a.sizes(), op, ": out_b shape ", out_b.sizes(),
              " must equal out_a shape ", out_a.sizes());
  const auto lead = out_a.sizes().slice(0, out_a.dim() - 1);
  TORCH_CHECK(lse_a.sizes() == lead, op, ": lse_a shape ", lse_a.sizes(),
              " must equal out_a's leading shape ", lead);
  TORCH_CHECK(lse_b.sizes() == lead, op, ": lse_b shape ", lse_b.sizes(),
              " must equal out_a's leading shape ", lead);
}

}  // namespace tokenspeed
