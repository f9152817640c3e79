"""Semantics of tokenspeed::mla_decode's CPU implementation against independent references."""

from __future__ import annotations

import math
import random

import pytest
import torch

import tokenspeed_kernels as tk
from tokenspeed_kernels.reference import mla_decode_ref
from tokenspeed_kernels.testing import assert_close, make_paged_kv


def _naive_decode(q, paged, scale, causal, dv):
    """Row-by-row float64 attention: a third implementation, with no masking tricks."""
    batch, q_len, heads, _ = q.shape
    out = torch.zeros(batch, q_len, heads, dv, dtype=torch.float64)
    lse = torch.full((batch, q_len, heads), -math.inf, dtype=torch.float64)
    for b in range(batch):
        kv = paged.dense(b).double()
        n = kv.shape[0]
        for i in range(q_len):
            visible = n - q_len + i + 1 if causal else n
            if visible <= 0:
                continue
            keys = kv[:visible]
            for h in range(heads):
                s = keys @ q[b, i, h].double() * scale
                m = s.max()
                w = torch.exp(s - m)
                lse[b, i, h] = m + torch.log(w.sum())
                out[b, i, h] = (w / w.sum()) @ keys[:, :dv]
    return out, lse


@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("q_len", [1, 2, 3, 4])
def test_cpu_matches_float64_reference(page_size: int, q_len: int, gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    for heads in (1, 16, 128):
        dim, dv = 80, 64  # small stand-ins for 576 / 512 keep the CPU test fast
        seqlens = [rng.choice([q_len, 1 + rng.randrange(200), page_size, 3 * page_size + 1]) for _ in range(3)]
        seqlens = [max(s, q_len) for s in seqlens]
        paged = make_paged_kv(seqlens, page_size, dim, torch.float64, generator=gen)
        q = torch.randn(len(seqlens), q_len, heads, dim, generator=gen, dtype=torch.float64)
        scale = dim**-0.5
        out, lse = tk.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, scale, True, dv)
        ref_out, ref_lse = mla_decode_ref(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, scale, True, dv)
        rel = (out - ref_out).norm() / ref_out.norm()
        assert rel < 1e-5, f"heads={heads} seqlens={seqlens}: relative error {rel:.2e}"
        assert_close(lse, ref_lse, "lse", torch.float64, "lse")


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_naive_rows(causal: bool, gen: torch.Generator) -> None:
    paged = make_paged_kv([7, 33, 4], 8, 24, torch.float64, generator=gen)
    q = torch.randn(3, 4, 3, 24, generator=gen, dtype=torch.float64)
    out, lse = tk.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, 0.2, causal, 16)
    ref_out, ref_lse = _naive_decode(q, paged, 0.2, causal, 16)
    assert_close(out, ref_out, "attention", torch.float64)
    assert_close(lse, ref_lse, "lse", torch.float64, "lse")


def test_causal_query_equals_single_token_decode_on_prefix(gen: torch.Generator) -> None:
    """Query i of q_len sees exactly the first L - q_len + i + 1 tokens (bottom-right causal)."""
    q_len, length = 4, 21
    paged = make_paged_kv([length], 8, 32, torch.float64, generator=gen)
    q = torch.randn(1, q_len, 5, 32, generator=gen, dtype=torch.float64)
    out, lse = tk.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, 0.3, True, 32)
    for i in range(q_len):
        prefix = torch.tensor([length - q_len + i + 1], dtype=torch.int32)
        o1, l1 = tk.mla_decode(q[:, i : i + 1], paged.kv_cache, paged.block_table, prefix, 0.3, True, 32)
        assert_close(out[:, i], o1[:, 0], "attention", torch.float64, f"query {i}")
        assert_close(lse[:, i], l1[:, 0], "lse", torch.float64, f"lse of query {i}")


def test_rows_without_keys_are_zero_with_minus_inf_lse(gen: torch.Generator) -> None:
    # length 2 < q_len 4: the first two queries see no key under causal masking.
    paged = make_paged_kv([2, 0], 4, 16, torch.float32, generator=gen)
    q = torch.randn(2, 4, 2, 16, generator=gen)
    out, lse = tk.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, 0.25, True, 8)
    assert torch.isfinite(out).all()
    assert (out[0, :2] == 0).all() and torch.isneginf(lse[0, :2]).all()
    assert torch.isfinite(lse[0, 2:]).all()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_within_tolerance(dtype: torch.dtype, gen: torch.Generator) -> None:
    paged = make_paged_kv([130, 64, 5], 64, 576, dtype, generator=gen)
    q = torch.randn(3, 2, 16, 576, generator=gen).to(dtype)
    scale = 192**-0.5
    out, lse = tk.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, scale, True, 512)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (3, 2, 16, 512) and lse.shape == (3, 2, 16)
    ref_out, ref_lse = mla_decode_ref(
        q.double(), paged.kv_cache.double(), paged.block_table, paged.cache_seqlens, scale, True, 512
    )
    assert_close(out, ref_out, "attention", dtype)
    assert_close(lse, ref_lse, "lse", dtype, "lse")


def test_fp8_cache_matches_dequantised(gen: torch.Generator) -> None:
    paged = make_paged_kv([40, 9], 16, 64, torch.float8_e4m3fn, generator=gen)
    kv_scale = torch.tensor([0.05])
    q = torch.randn(2, 1, 4, 64, generator=gen).to(torch.bfloat16)
    out, lse = tk.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, 0.1, True, 48, kv_scale)
    deq = paged.kv_cache.double() * 0.05
    ref_out, ref_lse = mla_decode_ref(q.double(), deq, paged.block_table, paged.cache_seqlens, 0.1, True, 48)
    assert_close(out, ref_out, "attention", torch.float8_e4m3fn)
    assert_close(lse, ref_lse, "lse", torch.float8_e4m3fn, "lse")
