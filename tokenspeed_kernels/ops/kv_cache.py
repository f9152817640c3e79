"""Paged KV cache write with quantise-on-store (``tokenspeed::kv_cache_write``) and its
dequantising gather.

The op is defined here (Python schema, a fragment of the ``tokenspeed`` library) with a CPU
implementation (the torch reference), a CUDA implementation (the Triton kernel) and a fake, so
``torch.ops.tokenspeed.kv_cache_write`` works from any engine, under ``torch.compile`` and in
CUDA graphs (no host sync on CUDA).
"""

from __future__ import annotations

import torch

from tokenspeed_kernels.reference.kv_cache import kv_cache_gather_ref, kv_cache_write_ref

OP = "kv_cache_write"
CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

torch.library.define(
    "tokenspeed::kv_cache_write",
    "(Tensor(a!) kv_cache, Tensor slots, Tensor values, Tensor? kv_scale=None) -> ()",
)


def check_fp8_kv_scale(op: str, kv_scale: torch.Tensor | None) -> None:
    """The per-tensor scale an e4m3 cache needs: float32, one value (every fp8 cache op checks it so)."""
    if kv_scale is None:
        raise ValueError(f"{op}: kv_cache is float8_e4m3fn, so kv_scale (float32 [1]) is required")
    if kv_scale.dtype != torch.float32:
        raise ValueError(f"{op}: kv_scale must be float32, got {kv_scale.dtype}")
    if kv_scale.numel() != 1:
        raise ValueError(f"{op}: kv_scale must hold one per-tensor scale, got shape {tuple(kv_scale.shape)}")


def check_kv_cache_write_args(
    kv_cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, kv_scale: torch.Tensor | None
) -> None:
    """Dtype, device, rank and shape checks (no values read: no device sync)."""
    if kv_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"{OP}: kv_cache must be bfloat16/float16/float32/float8_e4m3fn, got {kv_cache.dtype}")
    if values.dtype not in VALUE_DTYPES:
        raise ValueError(f"{OP}: values must be bfloat16/float16/float32, got {values.dtype}")
    if slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{OP}: slots must be int64 or int32, got {slots.dtype}")
    if kv_cache.dtype == torch.float8_e4m3fn:
        check_fp8_kv_scale(OP, kv_scale)
    elif kv_scale is not None:
        raise ValueError(f"{OP}: kv_scale is only meaningful with a float8_e4m3fn kv_cache (got {kv_cache.dtype})")
    for name, t in (("slots", slots), ("values", values), ("kv_scale", kv_scale)):
        if t is not None and t.device != kv_cache.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but kv_cache is on {kv_cache.device}")
    if kv_cache.dim() < 3:
        raise ValueError(f"{OP}: kv_cache must be [num_pages, page_size, ...], got shape {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError(f"{OP}: kv_cache must be contiguous")
    if slots.dim() != 1:
        raise ValueError(f"{OP}: slots must be 1-D [tokens], got shape {tuple(slots.shape)}")
    if values.dim() < 2 or values.shape[0] != slots.shape[0]:
        raise ValueError(f"{OP}: values must be [tokens={slots.shape[0]}, ...], got shape {tuple(values.shape)}")
    if tuple(values.shape[1:]) != tuple(kv_cache.shape[2:]):
        raise ValueError(
            f"{OP}: values.shape[1:] {tuple(values.shape[1:])} must equal kv_cache.shape[2:] {tuple(kv_cache.shape[2:])}"
        )


def check_slot_values(kv_cache: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None = None) -> None:
    """Checks that read values (a device sync on CUDA, so CPU and debug only): slots within the
    cache, and a positive finite kv_scale."""
    if kv_scale is not None:
        s = float(kv_scale.reshape(()))
        if not (s > 0.0 and s < float("inf")):
            raise ValueError(f"{OP}: kv_scale must be positive and finite, got {s}")
    num_slots = kv_cache.shape[0] * kv_cache.shape[1]
    bad = slots >= num_slots
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{OP}: slots[{i}] = {int(slots[i])} is past the cache ({num_slots} slots = num_pages x page_size)")


@torch.library.impl("tokenspeed::kv_cache_write", "CPU")
def _kv_cache_write_cpu(kv_cache, slots, values, kv_scale=None):
    check_kv_cache_write_args(kv_cache, slots, values, kv_scale)
    check_slot_values(kv_cache, slots, kv_scale)
    kv_cache_write_ref(kv_cache, slots, values, kv_scale)


@torch.library.impl("tokenspeed::kv_cache_write", "CUDA")
def _kv_cache_write_cuda(kv_cache, slots, values, kv_scale=None):
    if kv_cache.dtype == torch.float8_e4m3fn and torch.cuda.get_device_capability(kv_cache.device) < (8, 9):
        # no hardware e4m3 conversion for Triton before sm_89: torch's (same bytes, more launches)
        check_kv_cache_write_args(kv_cache, slots, values, kv_scale)
        kv_cache_write_ref(kv_cache, slots, values, kv_scale)
        return
    from tokenspeed_kernels.triton.kv_cache_write import kv_cache_write as triton_write

    triton_write(kv_cache, slots, values, kv_scale)


@torch.library.register_fake("tokenspeed::kv_cache_write")
def _kv_cache_write_fake(kv_cache, slots, values, kv_scale=None):
    check_kv_cache_write_args(kv_cache, slots, values, kv_scale)


def kv_cache_write(
    kv_cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, kv_scale: torch.Tensor | None = None
) -> None:
    """Write token rows into a paged cache, quantising on store when the cache is fp8.

    Args:
        kv_cache: ``[num_pages, page_size, *row]`` contiguous, bf16/fp16/fp32, or
            float8_e4m3fn with ``kv_scale`` (MLA: row = ``[576]``; MHA: ``[kv_heads, head_dim]``).
            Modified in place.
        slots: int64/int32 ``[tokens]``; token t goes to row ``slots[t]`` of
            ``kv_cache.flatten(0, 1)`` (``page * page_size + offset``). Negative: skipped. A slot
            past the cache is an error on the CPU and skipped on CUDA (checking would need a sync).
            Duplicate slots: one of the writes wins.
        values: ``[tokens, *row]`` bf16/fp16/fp32.
        kv_scale: float32 ``[1]`` per-tensor scale of an fp8 cache: the stored code is
            ``e4m3_rne(clamp(values / kv_scale, -448, 448))`` (NaN kept), and reading back gives
            ``code * kv_scale``. Must be None for other caches (plain ``values.to(kv_cache.dtype)``).
    """
    torch.ops.tokenspeed.kv_cache_write(kv_cache, slots, values, kv_scale)


def kv_cache_gather(
    kv_cache: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rows at ``slots`` as ``[len(slots), *row]``, dequantised (``code * kv_scale`` in fp32) and cast
    to ``dtype`` (default: float32 for an fp8 cache, the cache's own dtype otherwise).

    The prefill path reads a cached prefix through this: the same values the decode kernels see.
    Composite torch ops (index_select on a uint8 view for fp8), so it traces under torch.compile.
    """
    if kv_cache.dtype == torch.float8_e4m3fn:
        check_fp8_kv_scale("kv_cache_gather", kv_scale)
    return kv_cache_gather_ref(kv_cache, slots, kv_scale, dtype)


__all__ = ["check_fp8_kv_scale", "check_kv_cache_write_args", "check_slot_values", "kv_cache_gather", "kv_cache_write"]
