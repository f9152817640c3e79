"""What the Triton kernels share about the interpreter: whether it is running, and exact
fp32 -> bf16 rounding (its fp32 -> bf16 cast truncates instead of rounding to nearest even)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16_grid(x):
    """fp32 rounded to the nearest bf16 (ties to even), still in fp32; NaN kept."""
    bits = x.to(tl.int32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr, EXACT_CAST: tl.constexpr):
    """``x.to(DTYPE)`` with round-to-nearest-even also under the interpreter (``EXACT_CAST``)."""
    if EXACT_CAST and DTYPE == tl.bfloat16:
        x = round_to_bf16_grid(x)
    return x.to(DTYPE)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU tests): kernels then take their exact-rounding paths."""
    return bool(triton.knobs.runtime.interpret)


__all__ = ["cast_rne", "interpreting", "round_to_bf16_grid"]
