"""Bad input gets an error naming the op and the argument, never a crash or a wrong answer."""

from __future__ import annotations

import pytest
import torch

import tokenspeed_kernels as tk
from tokenspeed_kernels.testing import make_paged_kv


def _decode_args():
    paged = make_paged_kv([10, 3], 8, 40, torch.float32, generator=torch.Generator().manual_seed(0))
    q = torch.randn(2, 1, 4, 40)
    return dict(
        q=q,
        kv_cache=paged.kv_cache,
        block_table=paged.block_table,
        cache_seqlens=paged.cache_seqlens,
        softmax_scale=0.1,
        causal=True,
        head_dim_v=32,
    )


def _call_decode(**overrides):
    args = _decode_args()
    args.update(overrides)
    return tk.mla_decode(**args)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(q=torch.randn(2, 1, 4, 40).double()), r"kv_cache dtype \(Float\) must equal q dtype \(Double\)"),
        (dict(q=torch.randint(0, 3, (2, 1, 4, 40))), r"mla_decode: q must be"),
        (dict(block_table=torch.zeros(2, 3, dtype=torch.int64)), r"block_table must be Int, got Long"),
        (dict(cache_seqlens=torch.tensor([1.0, 2.0])), r"cache_seqlens must be Int"),
        (dict(q=torch.randn(2, 4, 40)), r"q must have rank 4"),
        (dict(q=torch.randn(2, 1, 4, 32)), r"kv_cache.shape\[2\] \(head_dim"),
        (dict(block_table=torch.zeros(3, 3, dtype=torch.int32)), r"block_table.shape\[0\] \(batch"),
        (dict(cache_seqlens=torch.tensor([10], dtype=torch.int32)), r"cache_seqlens.shape\[0\] \(batch"),
        (dict(cache_seqlens=torch.tensor([10, 100], dtype=torch.int32)), r"cache_seqlens\[1\] = 100 exceeds the block table"),
        (dict(cache_seqlens=torch.tensor([10, -1], dtype=torch.int32)), r"cache_seqlens\[1\] is negative"),
        (dict(head_dim_v=41), r"head_dim_v must be in \[1, 40\]"),
        (dict(softmax_scale=float("nan")), r"softmax_scale must be finite"),
        (dict(q=torch.randn(2, 1, 40, 4).transpose(-1, -2)), r"q must be contiguous in its last dimension"),
        (dict(kv_scale=torch.ones(1)), r"kv_scale is only meaningful with a float8_e4m3fn kv_cache"),
        (dict(q=torch.randn(2, 0, 4, 40)), r"q_len \(q.shape\[1\]\) must be >= 1"),
    ],
)
def test_mla_decode_bad_input(overrides, pattern) -> None:
    with pytest.raises(RuntimeError, match=pattern):
        _call_decode(**overrides)


def test_mla_decode_page_index_out_of_range() -> None:
    args = _decode_args()
    args["block_table"] = args["block_table"].clone()
    args["block_table"][0, 1] = 10_000
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1\] = 10000 is not a page of kv_cache"):
        tk.mla_decode(**args)


def test_mla_decode_fp8_needs_scale() -> None:
    args = _decode_args()
    args["kv_cache"] = args["kv_cache"].to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match=r"kv_scale \(float32 \[1\]\) is required"):
        tk.mla_decode(**args)


def _prefill(**overrides):
    args = dict(
        q=torch.randn(5, 4, 24),
        k=torch.randn(7, 2, 24),
        v=torch.randn(7, 2, 16),
        cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32),
        max_seqlen_q=3,
        max_seqlen_k=4,
        softmax_scale=0.2,
    )
    args.update(overrides)
    return tk.mla_prefill(**args)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(k=torch.randn(7, 3, 24), v=torch.randn(7, 3, 16)), r"heads \(q.shape\[1\] = 4\) must be a multiple of kv_heads"),
        (dict(v=torch.randn(6, 2, 16)), r"v.shape\[0\] \(total_k"),
        (dict(k=torch.randn(7, 2, 24).double()), r"q, k and v must share a dtype"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 2], dtype=torch.int32)), r"cu_seqlens_q must be non-decreasing"),
        (dict(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32)), r"cu_seqlens_q\[-1\] = 4 must equal"),
        (dict(cu_seqlens_k=torch.tensor([0, 3], dtype=torch.int32)), r"cu_seqlens_k.shape\[0\]"),
        (dict(max_seqlen_k=3), r"sequence 1 has length 4 > max_seqlen_k = 3"),
        (dict(cu_seqlens_q=torch.tensor([0, 2, 5])), r"cu_seqlens_q must be Int"),
    ],
)
def test_mla_prefill_bad_input(overrides, pattern) -> None:
    with pytest.raises(RuntimeError, match=pattern):
        _prefill(**overrides)


def test_merge_bad_input() -> None:
    a = torch.randn(3, 2, 8)
    la = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match=r"lse_b shape \[3, 3\] must equal out_a's leading shape"):
        tk.merge_attn_states(a, la, a, torch.randn(3, 3))
    with pytest.raises(RuntimeError, match=r"lse_a must be Float"):
        tk.merge_attn_states(a, la.double(), a, la)
    with pytest.raises(RuntimeError, match=r"out_b dtype must equal out_a dtype"):
        tk.merge_attn_states(a, la, a.double(), la)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(top_k=9), r"top_k must be in \[1, num_experts = 8\]"),
        (dict(top_k=2, n_group=3), r"n_group \(3\) must be >= 1 and divide num_experts \(8\)"),
        (dict(top_k=2, n_group=4, topk_group=5), r"topk_group must be in \[1, n_group = 4\]"),
        (dict(top_k=5, n_group=4, topk_group=2), r"top_k \(5\) exceeds the experts in the selected groups"),
        (dict(top_k=2, scoring_func="relu"), r'scoring_func must be "sigmoid" or "softmax", got "relu"'),
        (dict(top_k=2, correction_bias=torch.zeros(7)), r"correction_bias.shape\[0\] \(num_experts\) must be 8"),
    ],
)
def test_moe_route_bad_input(kwargs, pattern) -> None:
    with pytest.raises(RuntimeError, match=pattern):
        tk.moe_route(torch.randn(3, 8), **kwargs)


def _moe(**overrides):
    args = dict(
        hidden_states=torch.randn(4, 16),
        w13=torch.randn(3, 24, 16),
        w2=torch.randn(3, 16, 12),
        topk_weights=torch.rand(4, 2),
        topk_ids=torch.zeros(4, 2, dtype=torch.int32),
    )
    args.update(overrides)
    return tk.fused_moe(**args)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(w13=torch.randn(3, 24, 15)), r"w13.shape\[2\] \(hidden"),
        (dict(w2=torch.randn(3, 16, 10)), r"w2.shape\[2\] \(intermediate, must equal w13.shape\[1\] / 2\) must be 12"),
        (dict(topk_ids=torch.zeros(4, 2, dtype=torch.int64)), r"topk_ids must be Int, got Long"),
        (dict(topk_weights=torch.rand(4, 3)), r"topk_ids shape \[4, 2\] must equal topk_weights shape \[4, 3\]"),
        (dict(w13=torch.randn(3, 24, 16).to(torch.float8_e4m3fn)), r"w13 is float8_e4m3fn, so w2 must be too"),
        (dict(w13_scale=torch.ones(3, 1, 1)), r"only meaningful with float8_e4m3fn weights"),
        (dict(expert_offset=-1), r"expert_offset must be >= 0"),
    ],
)
def test_fused_moe_bad_input(overrides, pattern) -> None:
    with pytest.raises(RuntimeError, match=pattern):
        _moe(**overrides)


def test_fused_moe_fp8_needs_multiples_of_128() -> None:
    f8 = torch.float8_e4m3fn
    with pytest.raises(RuntimeError, match=r"multiples of 128"):
        _moe(
            w13=torch.randn(3, 24, 16).to(f8),
            w2=torch.randn(3, 16, 12).to(f8),
            w13_scale=torch.ones(3, 1, 1),
            w2_scale=torch.ones(3, 1, 1),
        )
