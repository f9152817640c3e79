"""Torch references of the paged KV cache write (quantise on store) and its dequantising gather.

Semantics (see ``tokenspeed_kernels.ops.kv_cache`` for the contract):

* fp8 cache: ``code = e4m3fn_rne(clamp(values.float() / kv_scale, -448, 448))``, an IEEE fp32
  division then round-to-nearest-even; NaN stays NaN (0x7F, or 0xFF when negative).
  Dequantisation is ``code.float() * kv_scale`` (exact widening, one fp32 multiply).
* any other cache dtype: ``values.to(kv_cache.dtype)`` (the scale must be absent).
* slot ``s`` is row ``s`` of ``kv_cache.flatten(0, 1)`` (``page * page_size + offset``); a
  negative slot is skipped (padding rows of a CUDA-graph batch may use -1).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def quantize_e4m3(values: torch.Tensor, kv_scale: torch.Tensor) -> torch.Tensor:
    """``values / kv_scale`` rounded to e4m3fn (ties to even), saturated at +-448, NaN kept."""
    x = values.float() / kv_scale.float().reshape(())
    # torch's own cast saturates in recent versions but produced NaN past the range in older
    # ones: clamp first so every version rounds the same. clamp keeps NaN.
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_e4m3(codes: torch.Tensor, kv_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes.float() * kv_scale`` (fp32), then cast to ``dtype``."""
    return (codes.float() * kv_scale.float().reshape(())).to(dtype)


def kv_cache_write_ref(
    kv_cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, kv_scale: torch.Tensor | None = None
) -> None:
    """Reference of ``tokenspeed::kv_cache_write`` (in place on ``kv_cache``)."""
    rows = kv_cache.view(kv_cache.shape[0] * kv_cache.shape[1], -1)
    keep = slots >= 0
    slots_kept = slots[keep].long()
    vals = values.reshape(values.shape[0], -1)[keep]
    if kv_cache.dtype == torch.float8_e4m3fn:
        assert kv_scale is not None, "an fp8 cache needs kv_scale"
        codes = quantize_e4m3(vals, kv_scale)
        # index_copy_ has no fp8 kernels on every device: move the bytes as uint8
        rows.view(torch.uint8).index_copy_(0, slots_kept, codes.view(torch.uint8))
    else:
        rows.index_copy_(0, slots_kept, vals.to(kv_cache.dtype))


def kv_cache_gather_ref(
    kv_cache: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rows of the cache at ``slots`` (``[len(slots), *kv_cache.shape[2:]]``), dequantised to ``dtype``
    (default: float32 for an fp8 cache, the cache's dtype otherwise)."""
    flat = kv_cache.view(kv_cache.shape[0] * kv_cache.shape[1], *kv_cache.shape[2:])
    if kv_cache.dtype == torch.float8_e4m3fn:
        assert kv_scale is not None, "an fp8 cache needs kv_scale"
        codes = flat.view(torch.uint8).index_select(0, slots.long()).view(torch.float8_e4m3fn)
        return dequantize_e4m3(codes, kv_scale, dtype or torch.float32)
    rows = flat.index_select(0, slots.long())
    return rows if dtype is None else rows.to(dtype)
