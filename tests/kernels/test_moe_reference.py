"""Semantics of tokenspeed::moe_route and tokenspeed::fused_moe (CPU implementations)."""

from __future__ import annotations

import pytest
import torch

import tokenspeed_kernels as tk
from tokenspeed_kernels.reference import fused_moe_ref, moe_route_ref
from tokenspeed_kernels.testing import assert_close


def _hf_deepseek_v3_route(logits, bias, top_k, n_group, topk_group, scaling):
    """Routing written the way Hugging Face's DeepseekV3 MoE gate computes it."""
    scores = logits.sigmoid()
    choice = scores + bias.unsqueeze(0)
    group_scores = choice.view(-1, n_group, logits.shape[1] // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, logits.shape[1] // n_group).reshape(-1, logits.shape[1])
    choice = choice.masked_fill(~score_mask.bool(), 0.0)
    idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling, idx


@pytest.mark.parametrize("tokens,experts,top_k,n_group,topk_group", [(1, 8, 2, 1, 1), (37, 64, 6, 1, 1), (19, 256, 8, 8, 4)])
def test_route_matches_reference_and_hf(tokens, experts, top_k, n_group, topk_group, gen: torch.Generator) -> None:
    logits = torch.randn(tokens, experts, generator=gen)
    bias = torch.rand(experts, generator=gen) * 0.1  # positive, so HF's 0.0 mask equals -inf
    w, ids = tk.moe_route(logits, top_k, "sigmoid", bias, n_group, topk_group, True, 2.5)
    rw, rids = moe_route_ref(logits, top_k, "sigmoid", bias, n_group, topk_group, True, 2.5)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids)
    assert_close(w, rw, "routing_weights", torch.float32, "weights")
    hw, hids = _hf_deepseek_v3_route(logits, bias, top_k, n_group, topk_group, 2.5)
    order = hids.sort(dim=-1).indices
    assert torch.equal(ids.long().sort(dim=-1).values, hids.gather(1, order))
    assert_close(w.gather(1, ids.long().sort(dim=-1).indices), hw.gather(1, order), "routing_weights", torch.float32)


def test_route_ties_prefer_lower_index() -> None:
    logits = torch.zeros(2, 8)  # all scores equal
    _, ids = tk.moe_route(logits, 3, "softmax")
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    _, ids = tk.moe_route(logits, 2, "sigmoid", torch.zeros(8), 4, 2)
    assert ids.tolist() == [[0, 1], [0, 1]]


def test_route_softmax_topk(gen: torch.Generator) -> None:
    logits = torch.randn(11, 16, generator=gen)
    w, ids = tk.moe_route(logits, 4, "softmax", None, 1, 1, False, 1.0)
    p = logits.softmax(-1)
    top = p.topk(4, dim=-1)
    assert torch.equal(ids.long(), top.indices)
    assert_close(w, top.values, "routing_weights", torch.float32)


def _experts(e, hidden, inter, dtype, gen):
    w13 = (torch.randn(e, 2 * inter, hidden, generator=gen) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=gen) * inter**-0.5).to(dtype)
    return w13, w2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_moe_matches_reference(dtype: torch.dtype, gen: torch.Generator) -> None:
    tokens, experts, top_k = 13, 8, 3
    x = torch.randn(tokens, 64, generator=gen).to(dtype)
    w13, w2 = _experts(experts, 64, 48, dtype, gen)
    w, ids = moe_route_ref(torch.randn(tokens, experts, generator=gen), top_k, "softmax")
    ids[0] = torch.tensor([5, 5, 5], dtype=torch.int32)[:top_k]  # repeated expert in one token
    out = tk.fused_moe(x, w13, w2, w, ids)
    ref = fused_moe_ref(x.double(), w13.double(), w2.double(), w, ids)
    assert out.dtype == dtype
    assert_close(out, ref, "moe", dtype)


def test_fused_moe_skewed_loads(gen: torch.Generator) -> None:
    """Experts with zero tokens, one token, and all tokens on one expert."""
    x = torch.randn(9, 32, generator=gen)
    w13, w2 = _experts(6, 32, 16, torch.float32, gen)
    w = torch.rand(9, 2, generator=gen)
    ids = torch.zeros(9, 2, dtype=torch.int32)
    ids[:, 1] = 3
    ids[4, 1] = 5  # expert 5: one token; experts 1, 2, 4: none
    assert_close(tk.fused_moe(x, w13, w2, w, ids), fused_moe_ref(x, w13, w2, w, ids), "moe", torch.float32)


def test_expert_parallel_shards_sum_to_whole(gen: torch.Generator) -> None:
    x = torch.randn(10, 32, generator=gen)
    w13, w2 = _experts(8, 32, 16, torch.float32, gen)
    w, ids = moe_route_ref(torch.randn(10, 8, generator=gen), 2, "softmax")
    whole = tk.fused_moe(x, w13, w2, w, ids)
    parts = sum(tk.fused_moe(x, w13[r * 4 : (r + 1) * 4], w2[r * 4 : (r + 1) * 4], w, ids, None, None, r * 4) for r in (0, 1))
    assert_close(parts, whole, "moe", torch.float32)


def test_fp8_block_scaled_experts(gen: torch.Generator) -> None:
    x = torch.randn(7, 256, generator=gen).to(torch.bfloat16)
    w13, w2 = _experts(4, 256, 128, torch.float32, gen)
    s13 = torch.rand(4, 2, 2, generator=gen) * 0.01 + 0.002
    s2 = torch.rand(4, 2, 1, generator=gen) * 0.01 + 0.002
    q13 = (w13 / s13.repeat_interleave(128, 1).repeat_interleave(128, 2)).to(torch.float8_e4m3fn)
    q2 = (w2 / s2.repeat_interleave(128, 1).repeat_interleave(128, 2)).to(torch.float8_e4m3fn)
    w, ids = moe_route_ref(torch.randn(7, 4, generator=gen), 2, "softmax")
    out = tk.fused_moe(x, q13, q2, w, ids, s13, s2)
    ref = fused_moe_ref(x, q13, q2, w, ids, s13, s2)
    assert_close(out, ref, "moe", torch.float8_e4m3fn)
    # and close to the unquantised experts (the quantisation error itself)
    dense = fused_moe_ref(x.float(), w13, w2, w, ids)
    assert (out.float() - dense).norm() / dense.norm() < 0.1
