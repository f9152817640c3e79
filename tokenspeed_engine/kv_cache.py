"""Paged KV caches, one tensor (or pair) per layer, and the paged write.

Page 0 is the null page: allocate ``num_pages`` including it and never hand it out.

* :class:`MLAKVCache` (DeepSeek): one latent cache per layer ``[num_pages, page_size,
  kv_lora_rank + qk_rope_head_dim]``: the normalised latent, then the rotated shared key. In the
  model's dtype, or in float8_e4m3fn with a per-tensor float32 scale per layer
  (``--kv-cache-dtype fp8``): half the bytes per token, so twice the tokens in the same memory.
  Writes quantise on store (``tokenspeed::kv_cache_write``); decode reads the codes directly
  (``mla_decode`` with ``kv_scale``); prefill reads them back dequantised (``kv_cache_gather``).
* :class:`MHAKVCache` (Llama): K and V per layer ``[num_pages, page_size, kv_heads, head_dim]``
  with this rank's KV heads.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("tokenspeed.kv_cache")

# --kv-cache-dtype choices: "auto" keeps the model's dtype
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
# Per-tensor scale of an fp8 cache when the checkpoint brings none: codes are the values
# themselves (|x| <= 448; the normalised latent and the rotated key are O(1)).
DEFAULT_FP8_KV_SCALE = 1.0


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache dtype of a ``--kv-cache-dtype`` choice for a model computing in ``model_dtype``."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_CACHE_DTYPES[name] or model_dtype


def kv_pool_tokens(budget_bytes: float, bytes_per_token: int) -> int:
    """Tokens a pool of ``budget_bytes`` holds: budget / (layers x row values x bytes per value)."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return int(budget_bytes // bytes_per_token)


def set_kv_cache_dtype(model: Any, name: str) -> torch.dtype:
    """Make ``model.make_kv_cache`` allocate ``name``'s dtype ("auto", "bf16", "fp8"); returns it.

    fp8 needs a model with an MLA latent cache (``supports_fp8_kv_cache``); the choice is logged.
    """
    dtype = resolve_kv_cache_dtype(name, model.dtype)
    if dtype == torch.float8_e4m3fn and not getattr(model, "supports_fp8_kv_cache", False):
        raise ValueError(f"--kv-cache-dtype fp8 needs an MLA model (DeepSeek-V3 family), not {type(model).__name__}")
    if dtype != model.dtype and not hasattr(model, "kv_cache_dtype"):
        raise ValueError(f"--kv-cache-dtype {name}: {type(model).__name__} keeps its cache in the model dtype only")
    if hasattr(model, "kv_cache_dtype"):
        model.kv_cache_dtype = dtype
    log.info("KV cache dtype: %s", str(dtype).replace("torch.", "") + (" (per-tensor scale)" if dtype.itemsize == 1 else ""))
    return dtype


def write_paged_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, kv_scale: torch.Tensor | None = None) -> None:
    """``cache.flatten(0, 1)[slots[t]] = values[t]`` (slots int64 ``page * page_size + offset``);
    an fp8 cache quantises on store with ``kv_scale`` (``tokenspeed::kv_cache_write``)."""
    if cache.dtype == torch.float8_e4m3fn:
        from tokenspeed_kernels.ops import kv_cache_write

        kv_cache_write(cache, slots, values, kv_scale)
        return
    flat = cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])
    flat.index_copy_(0, slots, values.to(cache.dtype))


def gather_paged_kv(
    cache: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rows of the cache at ``slots``: ``[len(slots), *cache.shape[2:]]``; an fp8 cache comes back
    dequantised (``code * kv_scale``) in ``dtype`` (default float32)."""
    if cache.dtype == torch.float8_e4m3fn:
        from tokenspeed_kernels.ops import kv_cache_gather

        return kv_cache_gather(cache, slots, kv_scale, dtype)
    rows = cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:]).index_select(0, slots)
    return rows if dtype is None else rows.to(dtype)


class MLAKVCache:
    """Latent caches of ``num_layers`` MLA layers (main layers first, then MTP layers).

    With ``dtype`` float8_e4m3fn every layer also has a float32 ``[1]`` scale (``scale(layer)``),
    ``kv_scale`` for all of them unless set per layer; otherwise ``scale(layer)`` is None.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        dim: int,
        dtype: torch.dtype,
        device: Any = None,
        kv_scale: float = DEFAULT_FP8_KV_SCALE,
    ):
        self.page_size, self.num_pages, self.dim, self.dtype = page_size, num_pages, dim, dtype
        self.layers = [torch.zeros(num_pages, page_size, dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.scales: list[torch.Tensor] | None = None
        if dtype == torch.float8_e4m3fn:
            if not (kv_scale > 0 and kv_scale < float("inf")):
                raise ValueError(f"kv_scale must be positive and finite, got {kv_scale}")
            self.scales = [torch.full((1,), kv_scale, dtype=torch.float32, device=device) for _ in range(num_layers)]

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.layers[layer]

    def scale(self, layer: int) -> torch.Tensor | None:
        """float32 ``[1]`` dequantisation scale of an fp8 layer (None for a 16/32-bit cache)."""
        return None if self.scales is None else self.scales[layer]

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
