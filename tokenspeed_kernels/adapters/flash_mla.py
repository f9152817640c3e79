"""FlashMLA-compatible dense decode API on top of ``torch.ops.tokenspeed.mla_decode``.

An engine written against FlashMLA (``from flash_mla import get_mla_metadata,
flash_mla_with_kvcache``) can import these two names from here instead::

    sched, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, sched, num_splits, causal=True)

Differences that matter:

* Scheduling is planned on the device from ``cache_seqlens`` inside every call, so the
  metadata is a placeholder: whatever ``get_mla_metadata`` returns (or any old-style
  ``tile_scheduler_metadata`` / ``num_splits`` tensors) is accepted and ignored, and
  ``cache_seqlens`` may change between calls without recomputing anything.
* Only the dense path: FP8 caches, sparse ``indices``, ``attn_sink`` and the extra
  cache arguments of newer FlashMLA versions raise ``NotImplementedError``.
* ``lse`` is returned as FlashMLA does, ``[batch, heads, s_q]`` float32 (natural log).
* The call goes through the dispatcher, so CPU tensors work too (the C++ reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FlashMLASchedMeta:
    """Placeholder for FlashMLA's tile-scheduler metadata: TokenSpeed plans on the device."""

    note: str = "tokenspeed plans the split-KV schedule on the device; nothing to precompute"


def get_mla_metadata(*args: Any, **kwargs: Any) -> tuple[FlashMLASchedMeta, None]:
    """Accepts FlashMLA's old and new signatures and returns ``(placeholder, None)``."""
    del args, kwargs
    return FlashMLASchedMeta(), None


_UNSUPPORTED = ("indices", "attn_sink", "extra_k_cache", "extra_indices_in_kvcache", "topk_length", "extra_topk_length")


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    tile_scheduler_metadata: Any = None,
    num_splits: Any = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's dense decode: ``q [B, s_q, H, D]``, ``k_cache [blocks, page, 1, D]``.

    Args:
        q: ``[batch, s_q, heads, head_dim]`` (DeepSeek: head_dim 576).
        k_cache: ``[num_blocks, page_block_size, 1, head_dim]``: one latent KV head.
        block_table: int32 ``[batch, max_blocks_per_seq]``.
        cache_seqlens: int32 ``[batch]``, keys per sequence including the s_q new tokens.
        head_dim_v: values per token (the first ``head_dim_v`` dims of each cached token).
        tile_scheduler_metadata, num_splits: ignored (see the module docstring).
        softmax_scale: defaults to ``head_dim ** -0.5`` as in FlashMLA.
        causal: bottom-right aligned causal mask for s_q > 1 (FlashMLA's default is False).
        is_fp8_kvcache: must be False.

    Returns:
        ``out [batch, s_q, heads, head_dim_v]`` in q's dtype and ``lse [batch, heads, s_q]`` float32.
    """
    del tile_scheduler_metadata, num_splits
    used = sorted(k for k in _UNSUPPORTED if kwargs.get(k) is not None)
    unknown = sorted(k for k in kwargs if k not in _UNSUPPORTED)
    if unknown:
        raise TypeError(f"flash_mla_with_kvcache: unexpected keyword arguments {unknown}")
    if used or is_fp8_kvcache:
        raise NotImplementedError(
            "flash_mla_with_kvcache (tokenspeed adapter): only the dense bf16 path is implemented; "
            f"got {used + (['is_fp8_kvcache'] if is_fp8_kvcache else [])}"
        )
    if k_cache.dim() != 4 or k_cache.shape[2] != 1:
        raise ValueError(
            "flash_mla_with_kvcache (tokenspeed adapter): k_cache must be [num_blocks, page_block_size, 1, head_dim] "
            f"(one latent KV head), got shape {tuple(k_cache.shape)}"
        )
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    out, lse = torch.ops.tokenspeed.mla_decode(
        q, k_cache.squeeze(2), block_table, cache_seqlens, float(softmax_scale), bool(causal), int(head_dim_v), None
    )
    return out, lse.transpose(1, 2).contiguous()
