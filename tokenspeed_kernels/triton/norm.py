"""Triton RMSNorm (with an optional fused residual add) and SiLU-and-mul: one kernel each
where the torch composite launches five to seven (pow, mean, rsqrt, mul, cast, mul, add), which
at decode batch sizes is launch latency, not bandwidth.

Contract: ``tokenspeed_kernels.ops.norm``. Same rounding steps as the reference (HF numerics):
the residual sum and the normalised row are rounded to x's dtype where the reference rounds
them, so outputs differ from it only by the order of the fp32 sum of squares and rsqrt's last
bit. One program per row for the norm (the row, at most 16K elements: ops.norm.MAX_NORM_DIM,
stays in registers);
rows x column blocks for SiLU-and-mul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenspeed_kernels.triton.rounding import cast_rne, interpreting


@triton.jit
def rms_scale_row(x, w, n, eps, X_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, EXACT_CAST: tl.constexpr):
    """RMSNorm of one row x (masked lanes 0) with HF's rounding steps: normalised in fp32, rounded
    to x's dtype, then times the weight, rounded to the output dtype."""
    h = x.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(h * h, axis=0) / n + eps)
    h = cast_rne(h * inv, X_DTYPE, EXACT_CAST)
    return cast_rne(w.to(tl.float32) * h.to(tl.float32), OUT_DTYPE, EXACT_CAST)


@triton.jit
def _rms_norm_kernel(X, R, W, OUT, RES_OUT, n, eps, stride_x, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, EXACT_CAST: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = cast_rne(x.to(tl.float32) + r.to(tl.float32), X.dtype.element_ty, EXACT_CAST)  # the add rounds to x's dtype
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = rms_scale_row(x, w, n, eps, X.dtype.element_ty, OUT.dtype.element_ty, EXACT_CAST)
    tl.store(OUT + row * stride_o + cols, y, mask=mask)


@triton.jit
def _silu_and_mul_kernel(X, OUT, n, stride_x, stride_o, BLOCK: tl.constexpr, EXACT_CAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    s = cast_rne(tl.div_rn(g, 1.0 + tl.exp(-g)), X.dtype.element_ty, EXACT_CAST)  # silu rounds to x's dtype first
    tl.store(OUT + row * stride_o + cols, cast_rne(s.to(tl.float32) * u, OUT.dtype.element_ty, EXACT_CAST), mask=mask)


def norm_num_warps(block: int) -> int:
    """Warps of a row norm over ``block`` lanes. Kernels that normalise a row (rms_norm, the MLA
    latent write) use the same count, and both compile without fp contraction, so their fp32 sums
    of squares are bit for bit the same."""
    return min(16, max(1, block // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with a unit last stride (a view when possible: e.g. a column slice)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    return x.reshape(-1, x.shape[-1])


def _norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    rows = x2.shape[0]
    if rows == 0:
        return out, res_out
    r2 = _rows(residual) if residual is not None else x2
    o2, ro2 = out.view(-1, n), res_out.view(-1, n)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, o2, ro2, n, float(eps), x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, EXACT_CAST=interpreting(), num_warps=norm_num_warps(block),
        enable_fp_fusion=False,  # the sum of squares without fma, as the reference and the MLA latent write
    )  # fmt: skip
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton ``tokenspeed::rms_norm`` (arguments checked by ``tokenspeed_kernels.ops.norm``)."""
    return _norm_launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``tokenspeed::fused_add_rms_norm``: (normed, x + residual) in one pass."""
    return _norm_launch(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton ``tokenspeed::silu_and_mul``: ``[..., 2N]`` -> ``[..., N]``."""
    n = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows and n:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
            x2, out.view(-1, n), n, x2.stride(0), n, BLOCK=block, EXACT_CAST=interpreting(), num_warps=4
        )
    return out


__all__ = ["fused_add_rms_norm", "norm_num_warps", "rms_norm", "rms_scale_row", "silu_and_mul"]
