"""Triton rotary position embedding: q and k of one token in one program, angles computed in
registers (no cos/sin cache), where the torch composite launches about twenty kernels per layer.

Contract: ``tokenspeed_kernels.ops.rotary``. The reference's rounding steps are kept (cos / sin
rounded to q's dtype, each product and each sum rounded), so bf16 outputs differ from it only
where the fp32 cos / sin differ in their last bit. That needs fp contraction off
(``enable_fp_fusion=False``): with it on, the compiler fuses ``x1 * c - x2 * s`` into a bf16
fma that skips the rounding of the product, and where the two products nearly cancel the
result moves by several of its ulps (seen on the H100: 3x the elementwise tolerance).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenspeed_kernels.triton.rounding import cast_rne, interpreting


@triton.jit
def rotary_cos_sin(POS, INV_FREQ, t, attention_factor, DTYPE: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_D: tl.constexpr, EXACT_CAST: tl.constexpr):  # fmt: skip
    """cos and sin [BLOCK_D] of token t's angles (fp32), times the factor, rounded to DTYPE as the
    reference rounds them; lanes past HALF are cos 1, sin 0 and never stored."""
    offs_d = tl.arange(0, BLOCK_D)
    pos = tl.load(POS + t).to(tl.float32)
    freq = pos * tl.load(INV_FREQ + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    c = cast_rne(tl.cos(freq) * attention_factor, DTYPE, EXACT_CAST).to(tl.float32)
    s = cast_rne(tl.sin(freq) * attention_factor, DTYPE, EXACT_CAST).to(tl.float32)
    return c, s


@triton.jit
def rotate_heads(X, OUT, t, t_out, heads, stride_xt, stride_xh, stride_ot, stride_oh, c, s, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr,
                 EXACT_CAST: tl.constexpr):  # fmt: skip
    """Row t of X [rows, heads, 2 * HALF] rotated into row t_out of OUT (both last-dim contiguous;
    other strides free, e.g. the rope columns of a wider tensor or of a KV cache row)."""
    dt = X.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HALF
    if INTERLEAVED:
        c1, c2 = 2 * offs_d, 2 * offs_d + 1
    else:
        c1, c2 = offs_d, offs_d + HALF
    for h0 in range(0, heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        m = (offs_h < heads)[:, None] & d_ok[None, :]
        base = X + t * stride_xt + offs_h[:, None].to(tl.int64) * stride_xh
        x1 = tl.load(base + c1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + c2[None, :], mask=m, other=0.0).to(tl.float32)
        a = cast_rne(x1 * c[None, :], dt, EXACT_CAST).to(tl.float32)
        b = cast_rne(x2 * s[None, :], dt, EXACT_CAST).to(tl.float32)
        e = cast_rne(x2 * c[None, :], dt, EXACT_CAST).to(tl.float32)
        f = cast_rne(x1 * s[None, :], dt, EXACT_CAST).to(tl.float32)
        out = OUT + t_out * stride_ot + offs_h[:, None].to(tl.int64) * stride_oh
        tl.store(out + offs_d[None, :], cast_rne(a - b, OUT.dtype.element_ty, EXACT_CAST), mask=m)
        tl.store(out + HALF + offs_d[None, :], cast_rne(e + f, OUT.dtype.element_ty, EXACT_CAST), mask=m)


@triton.jit
def _rotary_kernel(POS, INV_FREQ, Q, K, Q_OUT, K_OUT, q_heads, k_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                   attention_factor, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   INTERLEAVED: tl.constexpr, EXACT_CAST: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    c, s = rotary_cos_sin(POS, INV_FREQ, t, attention_factor, Q.dtype.element_ty, HALF, BLOCK_D, EXACT_CAST)
    # outputs are contiguous [T, heads, 2 * HALF]
    rotate_heads(Q, Q_OUT, t, t, q_heads, stride_qt, stride_qh, q_heads * 2 * HALF, 2 * HALF, c, s, HALF, BLOCK_H,
                 BLOCK_D, INTERLEAVED, EXACT_CAST)  # fmt: skip
    rotate_heads(K, K_OUT, t, t, k_heads, stride_kt, stride_kh, k_heads * 2 * HALF, 2 * HALF, c, s, HALF, BLOCK_H,
                 BLOCK_D, INTERLEAVED, EXACT_CAST)  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``tokenspeed::rotary_embedding`` (arguments checked by ``tokenspeed_kernels.ops.rotary``)."""
    tokens, q_heads, dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    half = dim // 2
    block_d, block_h = rotary_blocks(half, max(q_heads, k.shape[1]))
    _rotary_kernel[(tokens,)](
        positions, inv_freq, q, k, q_out, k_out, q_heads, k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        float(attention_factor), HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, INTERLEAVED=bool(interleaved),
        EXACT_CAST=interpreting(), num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return q_out, k_out


def rotary_blocks(half: int, heads: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_H) of the rotation: all of a head's pairs, up to 16 heads, <= 2048 lanes."""
    block_d = triton.next_power_of_2(half)
    return block_d, max(1, min(16, triton.next_power_of_2(heads), 2048 // block_d))


__all__ = ["rotary_blocks", "rotary_cos_sin", "rotate_heads", "rotary_embedding"]
