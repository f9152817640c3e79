"""Triton paged KV write: one program per (token, column block), quantising to e4m3 on store.

Contract: ``tokenspeed_kernels.ops.kv_cache.kv_cache_write``. The fp8 code of a value is
``e4m3_rne(clamp(x / kv_scale, -448, 448))`` with an IEEE division (``tl.div_rn``), so the bytes
equal the torch reference's exactly. The code is computed with integer arithmetic
(``_e4m3_code``, equal to torch's byte for every bf16 value: tested) and stored through a uint8
view of the cache, on the GPU too (the Triton interpreter's cast drops the carry into the
exponent, 1.98 -> 1.0, and one code path for both keeps them equal). The one byte the H100 runs
of 2026-11-23 missed per bf16 test case was a negative NaN: the GPU's division returns a
positive canonical NaN (0x7F where torch writes 0xFF), so a NaN's code takes the input's sign.
A bf16 cache's rounding is done on the bf16 grid under the interpreter, whose cast truncates.

Graph-safe: no host sync; a negative slot is skipped, and so is a slot past the cache (no
memory outside the cache is ever written; the CPU op reports such slots as errors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenspeed_kernels.triton.rounding import interpreting as _interpreting
from tokenspeed_kernels.triton.rounding import round_to_bf16_grid

E4M3_MAX: tl.constexpr = tl.constexpr(448.0)


@triton.jit
def _e4m3_code(x):
    """e4m3fn byte (as int32) of fp32 ``x`` already clamped to [-448, 448]; ties to even, NaN kept."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a_bits = bits & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    # normal range (a >= 2^-6): keep 3 mantissa bits with a ties-to-even carry, re-bias 127 -> 7
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormals: multiples of 2^-9; adding 1.5 * 2^23 makes fp32 round to an integer (to even)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.where(a_bits > 0x7F800000, 0x7F, code)  # NaN
    return code | sign


@triton.jit
def _kv_cache_write_kernel(
    CACHE,
    SLOTS,
    VALUES,
    KV_SCALE,
    num_slots,
    row_len,
    stride_v,
    BLOCK: tl.constexpr,
    FP8: tl.constexpr,
    SOFT_BF16: tl.constexpr,  # interpreter: round to the bf16 grid in fp32 (its cast truncates)
):
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):
        return
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < row_len
    x = tl.load(VALUES + t * stride_v + offs, mask=ok, other=0.0)
    dst = CACHE + slot * row_len + offs
    if FP8:
        xf = x.to(tl.float32)
        # NaN keeps its sign (0x7F / 0xFF, as torch's cast): the GPU's division returns the
        # canonical, positive NaN, so the sign comes from the input
        nan_code = 0x7F | ((xf.to(tl.int32, bitcast=True) >> 24) & 0x80)
        x = tl.div_rn(xf, tl.load(KV_SCALE))
        x = tl.minimum(tl.maximum(x, -E4M3_MAX), E4M3_MAX)  # saturate
        code = tl.where(xf != xf, nan_code, _e4m3_code(x))
        tl.store(dst, code.to(tl.uint8), mask=ok)  # CACHE is a uint8 view
    else:
        if SOFT_BF16 and CACHE.dtype.element_ty == tl.bfloat16:
            x = round_to_bf16_grid(x.to(tl.float32))  # the interpreter's cast truncates
        tl.store(dst, x.to(CACHE.dtype.element_ty), mask=ok)


def kv_cache_write(
    kv_cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, kv_scale: torch.Tensor | None = None
) -> None:
    """Write ``values[t]`` into slot ``slots[t]`` of ``kv_cache`` (in place); arguments and
    semantics as ``tokenspeed_kernels.ops.kv_cache.kv_cache_write``. Validated without a sync
    (slot values are checked only with TOKENSPEED_DEBUG_CHECKS=1)."""
    from tokenspeed_kernels import env
    from tokenspeed_kernels.ops.kv_cache import check_kv_cache_write_args, check_slot_values

    check_kv_cache_write_args(kv_cache, slots, values, kv_scale)
    if env.flag(env.DEBUG_CHECKS):
        check_slot_values(kv_cache, slots, kv_scale)
    tokens = values.shape[0]
    if tokens == 0:
        return
    row_len = kv_cache[0, 0].numel()
    num_slots = kv_cache.shape[0] * kv_cache.shape[1]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    block = min(1024, triton.next_power_of_2(row_len))
    vals = values.reshape(tokens, row_len)
    if vals.stride(1) != 1:
        vals = vals.contiguous()
    _kv_cache_write_kernel[(tokens, triton.cdiv(row_len, block))](
        kv_cache.view(torch.uint8) if fp8 else kv_cache, slots, vals, kv_scale if fp8 else vals,
        num_slots, row_len, vals.stride(0),
        BLOCK=block, FP8=fp8, SOFT_BF16=_interpreting(), num_warps=4,
    )  # fmt: skip


__all__ = ["kv_cache_write"]
