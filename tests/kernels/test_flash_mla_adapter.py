"""The FlashMLA-style adapter computes exactly tokenspeed::mla_decode (CPU op here)."""

from __future__ import annotations

import pytest
import torch

from tokenspeed_kernels.adapters import FlashMLASchedMeta, flash_mla, flash_mla_with_kvcache, get_mla_metadata
from tokenspeed_kernels.testing import make_paged_kv


def _inputs(gen: torch.Generator, seqlens: list[int], s_q: int, heads: int, dtype: torch.dtype = torch.bfloat16):
    paged = make_paged_kv(seqlens, 64, 576, dtype, generator=gen)
    q = torch.randn(len(seqlens), s_q, heads, 576, generator=gen).to(dtype)
    k_cache = paged.kv_cache.unsqueeze(2)  # FlashMLA layout [blocks, page, h_k = 1, 576]
    return q, k_cache, paged


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q", [1, 3])
def test_matches_mla_decode(causal: bool, s_q: int, gen: torch.Generator) -> None:
    q, k_cache, paged = _inputs(gen, [70, 5, 130], s_q, 4)
    sched, num_splits = get_mla_metadata(paged.cache_seqlens, s_q * 4, 1)
    out, lse = flash_mla_with_kvcache(
        q, k_cache, paged.block_table, paged.cache_seqlens, 512, sched, num_splits, softmax_scale=0.05, causal=causal
    )
    ref_out, ref_lse = torch.ops.tokenspeed.mla_decode(
        q, paged.kv_cache, paged.block_table, paged.cache_seqlens, 0.05, causal, 512, None
    )
    assert out.shape == (3, s_q, 4, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (3, 4, s_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert torch.equal(out, ref_out)
    assert torch.equal(lse, ref_lse.transpose(1, 2))


def test_defaults_follow_flash_mla(gen: torch.Generator) -> None:
    """softmax_scale defaults to head_dim ** -0.5 and causal to False, as in FlashMLA."""
    q, k_cache, paged = _inputs(gen, [40, 9], 2, 2, torch.float32)
    out, lse = flash_mla_with_kvcache(q, k_cache, paged.block_table, paged.cache_seqlens, 512, None, None)
    ref_out, ref_lse = torch.ops.tokenspeed.mla_decode(
        q, paged.kv_cache, paged.block_table, paged.cache_seqlens, 576**-0.5, False, 512, None
    )
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse.transpose(1, 2))


def test_metadata_is_a_placeholder_for_any_signature(gen: torch.Generator) -> None:
    q, k_cache, paged = _inputs(gen, [33], 1, 2)
    placeholders = [
        get_mla_metadata(),
        get_mla_metadata(paged.cache_seqlens, 2, 1),
        get_mla_metadata(cache_seqlens=paged.cache_seqlens, num_q_tokens_per_head_k=2, num_heads_k=1, is_fp8_kvcache=False),
        (torch.zeros(132, 8, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)),  # old FlashMLA tensors
    ]
    assert isinstance(placeholders[0][0], FlashMLASchedMeta) and placeholders[0][1] is None
    results = [
        flash_mla_with_kvcache(q, k_cache, paged.block_table, paged.cache_seqlens, 512, meta, splits, causal=True)
        for meta, splits in placeholders
    ]
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_rejects_what_it_does_not_implement(gen: torch.Generator) -> None:
    q, k_cache, paged = _inputs(gen, [10], 1, 2)
    args = (q, k_cache, paged.block_table, paged.cache_seqlens, 512, None, None)
    with pytest.raises(NotImplementedError, match="only the dense bf16 path"):
        flash_mla_with_kvcache(*args, is_fp8_kvcache=True)
    with pytest.raises(NotImplementedError, match=r"\['indices'\]"):
        flash_mla_with_kvcache(*args, indices=torch.zeros(1, 1, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="unexpected keyword"):
        flash_mla_with_kvcache(*args, bogus=1)
    with pytest.raises(ValueError, match="one latent KV head"):
        flash_mla_with_kvcache(q, k_cache.expand(-1, -1, 2, -1), *args[2:])
    with pytest.raises(RuntimeError, match="head_dim_v must be in"):
        flash_mla_with_kvcache(q, k_cache, paged.block_table, paged.cache_seqlens, 600, None, None)


def test_module_exports() -> None:
    assert flash_mla.flash_mla_with_kvcache is flash_mla_with_kvcache
    assert flash_mla.get_mla_metadata is get_mla_metadata
