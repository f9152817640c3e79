"""Fake (meta) implementations: output shapes and dtypes only.

They let ``torch.compile(fullgraph=True)`` trace through the ops and
``torch.library.opcheck`` verify the schemas. Shapes follow the C++ schemas in
csrc/torch_library.cpp.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("tokenspeed::mla_decode")
def _mla_decode_fake(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal=True, head_dim_v=512, kv_scale=None):
    batch, q_len, heads, _ = q.shape
    return q.new_empty(batch, q_len, heads, head_dim_v), q.new_empty(batch, q_len, heads, dtype=torch.float32)


@torch.library.register_fake("tokenspeed::mla_prefill")
def _mla_prefill_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal=True):
    tokens, heads, _ = q.shape
    return q.new_empty(tokens, heads, v.shape[2]), q.new_empty(tokens, heads, dtype=torch.float32)


@torch.library.register_fake("tokenspeed::merge_attn_states")
def _merge_attn_states_fake(out_a, lse_a, out_b, lse_b):
    return torch.empty_like(out_a), torch.empty_like(lse_a)


@torch.library.register_fake("tokenspeed::moe_route")
def _moe_route_fake(
    router_logits,
    top_k,
    scoring_func="sigmoid",
    correction_bias=None,
    n_group=1,
    topk_group=1,
    renormalize=True,
    routed_scaling_factor=1.0,
):
    tokens = router_logits.shape[0]
    return (
        router_logits.new_empty(tokens, top_k, dtype=torch.float32),
        router_logits.new_empty(tokens, top_k, dtype=torch.int32),
    )


@torch.library.register_fake("tokenspeed::fused_moe")
def _fused_moe_fake(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None, expert_offset=0):
    return torch.empty_like(hidden_states)
