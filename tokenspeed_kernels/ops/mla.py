"""MLA attention ops: absorbed paged decode, ragged prefill, and LSE merge.

Every function here calls ``torch.ops.tokenspeed.<op>``, which dispatches on the
inputs' device (CPU: the C++ torch reference; CUDA: the compiled kernel). The
engine picks among all backends (Triton, CUDA, reference) through
``tokenspeed_kernels.registry`` instead.
"""

from __future__ import annotations

import torch


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    head_dim_v: int = 512,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed multi-head latent attention over a paged latent KV cache.

    Args:
        q: ``[batch, q_len, heads, head_dim]`` bf16/fp16/fp32/fp64, last dim contiguous.
            DeepSeek: head_dim = 576 = 512 latent (kv_lora_rank) + 64 rope. Query i of the
            q_len new tokens sits at absolute position ``cache_seqlens[b] - q_len + i``.
        kv_cache: ``[num_pages, page_size, head_dim]`` contiguous, q's dtype, or
            float8_e4m3fn with ``kv_scale``. One latent KV head shared by all query heads;
            keys are all head_dim values, values are the first ``head_dim_v``.
        block_table: int32 ``[batch, max_pages_per_seq]``; logical page p of sequence b is
            ``kv_cache[block_table[b, p]]``. Entries past a sequence's length are never read.
        cache_seqlens: int32 ``[batch]``, tokens in the cache per sequence *including* the
            q_len new tokens; at most ``max_pages_per_seq * page_size``.
        softmax_scale: multiplies q.k (DeepSeek: ``qk_head_dim ** -0.5`` times the YaRN mscale²).
        causal: for q_len > 1 (speculative verify), bottom-right aligned: query i sees keys
            ``0 .. cache_seqlens[b] - q_len + i``. With q_len = 1 it changes nothing.
        head_dim_v: values per token (DeepSeek 512).
        kv_scale: float32 ``[1]`` per-tensor dequantisation scale of an fp8 cache.

    Returns:
        ``out``: ``[batch, q_len, heads, head_dim_v]`` in q's dtype;
        ``lse``: float32 ``[batch, q_len, heads]``, natural-log sum of exp of the scaled
        scores. A row that sees no key gets out = 0 and lse = -inf.
    """
    return torch.ops.tokenspeed.mla_decode(
        q, kv_cache, block_table, cache_seqlens, float(softmax_scale), causal, head_dim_v, kv_scale
    )


def mla_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-absorbed ragged attention for prefill and chunked prefill over a cached prefix.

    Args:
        q: ``[total_q, heads, head_dim_qk]`` (DeepSeek: 192 = 128 nope + 64 rope), sequences
            packed back to back without padding; bf16/fp16/fp32/fp64, last dim contiguous.
        k: ``[total_k, kv_heads, head_dim_qk]``, q's dtype; heads % kv_heads == 0 (MLA: equal).
        v: ``[total_k, kv_heads, head_dim_v]`` (DeepSeek: 128), q's dtype.
        cu_seqlens_q: int32 ``[batch + 1]``, cumulative query lengths starting at 0.
        cu_seqlens_k: int32 ``[batch + 1]``, cumulative key lengths; a sequence's keys may be
            longer than its queries (a new chunk attending to its cached prefix).
        max_seqlen_q: bound on any sequence's query length (sizes kernel grids).
        max_seqlen_k: bound on any sequence's key length.
        softmax_scale: multiplies q.k.
        causal: bottom-right aligned: query i of lq sees keys ``j <= lk - lq + i``.

    Returns:
        ``out`` ``[total_q, heads, head_dim_v]`` in q's dtype and ``lse`` float32
        ``[total_q, heads]`` (natural log; -inf and out = 0 for a row that sees no key).
    """
    return torch.ops.tokenspeed.mla_prefill(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), float(softmax_scale), causal
    )


def merge_attn_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint key sets (e.g. cached prefix + new chunk).

    Args:
        out_a, out_b: ``[..., head_dim]`` (typically ``[tokens, heads, head_dim]``), same shape
            and dtype (bf16/fp16/fp32; fp64 on CPU).
        lse_a, lse_b: float32 ``[...]`` (the leading shape of out), natural log; -inf marks a
            side that saw no key.

    Returns:
        ``(out, lse)`` equal to attention over the union of both key sets.
    """
    return torch.ops.tokenspeed.merge_attn_states(out_a, lse_a, out_b, lse_b)
