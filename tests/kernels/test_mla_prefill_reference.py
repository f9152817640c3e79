"""Semantics of tokenspeed::mla_prefill and merge_attn_states (CPU implementations)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import tokenspeed_kernels as tk
from tokenspeed_kernels.reference import merge_attn_states_ref, mla_prefill_ref
from tokenspeed_kernels.testing import assert_close


def _ragged(lq: list[int], lk: list[int], heads: int, kv_heads: int, dqk: int, dv: int, dtype, gen):
    q = torch.randn(sum(lq), heads, dqk, generator=gen).to(dtype)
    k = torch.randn(sum(lk), kv_heads, dqk, generator=gen).to(dtype)
    v = torch.randn(sum(lk), kv_heads, dv, generator=gen).to(dtype)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lq), cu(lk)


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_matches_reference_ragged(causal: bool, gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    lq = [rng.randrange(1, 300) for _ in range(4)] + [0]
    lk = [q + rng.randrange(0, 120) for q in lq]
    q, k, v, cq, ck = _ragged(lq, lk, 4, 2, 48, 32, torch.float64, gen)
    out, lse = tk.mla_prefill(q, k, v, cq, ck, max(lq), max(lk), 0.15, causal)
    ref_out, ref_lse = mla_prefill_ref(q, k, v, cq, ck, max(lq), max(lk), 0.15, causal)
    assert_close(out, ref_out, "attention", torch.float64)
    assert_close(lse, ref_lse, "lse", torch.float64, "lse")


@pytest.mark.parametrize("causal", [True, False])
def test_equal_lengths_match_sdpa(causal: bool, gen: torch.Generator) -> None:
    q, k, v, cq, ck = _ragged([37], [37], 3, 3, 24, 16, torch.float64, gen)
    out, _ = tk.mla_prefill(q, k, v, cq, ck, 37, 37, 24**-0.5, causal)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal
    ).transpose(0, 1)
    assert_close(out, sdpa, "attention", torch.float64)


def test_chunk_over_prefix_is_bottom_right_causal(gen: torch.Generator) -> None:
    """A 5-token chunk after a 20-token prefix equals the last 5 rows of full causal attention."""
    q, k, v, _, _ = _ragged([25], [25], 2, 2, 16, 16, torch.float64, gen)
    full, full_lse = tk.mla_prefill(q, k, v, *[torch.tensor([0, 25], dtype=torch.int32)] * 2, 25, 25, 0.3, True)
    cq = torch.tensor([0, 5], dtype=torch.int32)
    ck = torch.tensor([0, 25], dtype=torch.int32)
    chunk, chunk_lse = tk.mla_prefill(q[20:], k, v, cq, ck, 5, 25, 0.3, True)
    assert_close(chunk, full[20:], "attention", torch.float64)
    assert_close(chunk_lse, full_lse[20:], "lse", torch.float64, "lse")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merge_of_two_halves_equals_whole(dtype: torch.dtype, gen: torch.Generator) -> None:
    q, k, v, _, _ = _ragged([9], [40], 4, 4, 32, 32, torch.float64, gen)
    cq = torch.tensor([0, 9], dtype=torch.int32)
    whole, whole_lse = tk.mla_prefill(q, k, v, cq, torch.tensor([0, 40], dtype=torch.int32), 9, 40, 0.2, False)
    half = torch.tensor([0, 17], dtype=torch.int32)
    rest = torch.tensor([0, 23], dtype=torch.int32)
    a, la = tk.mla_prefill(q, k[:17], v[:17], cq, half, 9, 17, 0.2, False)
    b, lb = tk.mla_prefill(q, k[17:], v[17:], cq, rest, 9, 23, 0.2, False)
    out, lse = tk.merge_attn_states(a.to(dtype), la, b.to(dtype), lb)
    assert out.dtype == dtype
    # lse is float32 by contract, so a float64 merge is only float32-accurate.
    tol = torch.float32 if dtype == torch.float64 else dtype
    assert_close(out, whole, "attention", tol)
    assert_close(lse, whole_lse, "lse", tol, "lse")
    ref_out, ref_lse = merge_attn_states_ref(a.to(dtype), la, b.to(dtype), lb)
    assert_close(out, ref_out, "attention", dtype)


def test_merge_handles_empty_sides(gen: torch.Generator) -> None:
    a = torch.randn(3, 2, 8, generator=gen)
    b = torch.randn(3, 2, 8, generator=gen)
    la = torch.tensor([[0.5, -torch.inf], [-torch.inf, -torch.inf], [1.0, 2.0]])
    lb = torch.tensor([[-torch.inf, 0.3], [-torch.inf, -torch.inf], [2.0, 1.0]])
    out, lse = tk.merge_attn_states(a, la, b, lb)
    assert torch.allclose(out[0, 0], a[0, 0]) and torch.allclose(out[0, 1], b[0, 1])
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out).all()
    ref_out, ref_lse = merge_attn_states_ref(a, la, b, lb)
    assert_close(out, ref_out, "attention", torch.float32)
    assert_close(lse, ref_lse, "lse", torch.float32, "lse")
