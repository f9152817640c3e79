"""Paged KV caches, one tensor (or pair) per layer, and the paged write.

Page 0 is the null page: allocate ``num_pages`` including it and never hand it out.

* :class:`MLAKVCache` (DeepSeek): one latent cache per layer ``[num_pages, page_size,
  kv_lora_rank + qk_rope_head_dim]``: the normalised latent, then the rotated shared key.
* :class:`MHAKVCache` (Llama): K and V per layer ``[num_pages, page_size, kv_heads, head_dim]``
  with this rank's KV heads.
"""

from __future__ import annotations

from typing import Any

import torch


def write_paged_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """``cache.flatten(0, 1)[slots[t]] = values[t]`` (slots int64 ``page * page_size + offset``)."""
    flat = cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])
    flat.index_copy_(0, slots, values.to(cache.dtype))


def gather_paged_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of the cache at ``slots``: ``[len(slots), *cache.shape[2:]]``."""
    return cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:]).index_select(0, slots)


class MLAKVCache:
    """Latent caches of ``num_layers`` MLA layers (main layers first, then MTP layers)."""

    def __init__(
        self, num_layers: int, num_pages: int, page_size: int, dim: int, dtype: torch.dtype, device: Any = None
    ):
        self.page_size, self.num_pages, self.dim = page_size, num_pages, dim
        self.layers = [torch.zeros(num_pages, page_size, dim, dtype=dtype, device=device) for _ in range(num_layers)]

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)


class MHAKVCache:
    """K and V caches of ``num_layers`` attention layers."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Any = None,
    ):
        self.page_size, self.num_pages = page_size, num_pages
        shape = (num_pages, page_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def __len__(self) -> int:
        return len(self.k)
