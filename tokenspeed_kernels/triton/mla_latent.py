"""Triton MLA latent write: one program per token does the kv_a RMSNorm, the rotation of k_pe
and q_pe, and the store of the latent row into the paged cache, where the model composed five
kernels (norm, rotary, cat, index_copy, the copy of q_pe into the absorbed query).

Contract: ``tokenspeed_kernels.ops.mla_latent``. The rounding steps are those of the norm and
rotary kernels (shared helpers), and the row sum runs on as many warps as rms_norm's with fp
contraction off in both (as in the rotary kernel), so results equal theirs bit for bit: on the
H100, a different warp count or an fma in the sum of squares moved fp32 rows by an ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenspeed_kernels.triton.norm import norm_num_warps, rms_scale_row
from tokenspeed_kernels.triton.rotary import rotary_blocks, rotary_cos_sin, rotate_heads
from tokenspeed_kernels.triton.rounding import interpreting


@triton.jit
def _mla_latent_write_kernel(POS, INV_FREQ, LATENT, W, QPE, QPE_OUT, CACHE, SLOTS, rank, q_heads, stride_lt,
                             stride_qt, stride_qh, stride_ot, stride_oh, eps, attention_factor, RANK: tl.constexpr,
                             BLOCK_R: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr, EXACT_CAST: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    row = RANK + 2 * HALF  # values per cache row
    cols = tl.arange(0, BLOCK_R)
    mask = cols < RANK
    x = tl.load(LATENT + t * stride_lt + cols, mask=mask, other=0.0)
    w = tl.load(W + cols, mask=mask, other=0.0)
    # rank (= RANK) as a run-time value: a division by a compile-time 24 becomes a multiplication by
    # its reciprocal, rounded differently from rms_norm's division
    c_row = rms_scale_row(x, w, rank, eps, LATENT.dtype.element_ty, CACHE.dtype.element_ty, EXACT_CAST)
    tl.store(CACHE + slot * row + cols, c_row, mask=mask)
    c, s = rotary_cos_sin(POS, INV_FREQ, t, attention_factor, LATENT.dtype.element_ty, HALF, BLOCK_D, EXACT_CAST)
    # k_pe: the latent's last 2 * HALF values -> the cache row's; one head
    rotate_heads(LATENT + RANK, CACHE + RANK, t, slot, 1, stride_lt, 0, row, 0, c, s, HALF, 1, BLOCK_D, INTERLEAVED,
                 EXACT_CAST)  # fmt: skip
    rotate_heads(QPE, QPE_OUT, t, t, q_heads, stride_qt, stride_qh, stride_ot, stride_oh, c, s, HALF, BLOCK_H, BLOCK_D,
                 INTERLEAVED, EXACT_CAST)  # fmt: skip


def mla_latent_write(
    positions: torch.Tensor,
    latent: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    q_pe: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float,
    interleaved: bool,
    cache: torch.Tensor,
    slots: torch.Tensor,
    q_pe_out: torch.Tensor,
) -> None:
    """Triton ``tokenspeed::mla_latent_write`` (arguments checked by ``tokenspeed_kernels.ops.mla_latent``)."""
    tokens, q_heads, dim = q_pe.shape
    if tokens == 0:
        return
    rank = norm_weight.shape[0]
    block_r = triton.next_power_of_2(rank)
    block_d, block_h = rotary_blocks(dim // 2, q_heads)
    _mla_latent_write_kernel[(tokens,)](
        positions, inv_freq, latent, norm_weight, q_pe, q_pe_out, cache, slots, rank, q_heads, latent.stride(0),
        q_pe.stride(0), q_pe.stride(1), q_pe_out.stride(0), q_pe_out.stride(1), float(eps), float(attention_factor),
        RANK=rank, BLOCK_R=block_r, HALF=dim // 2, BLOCK_H=block_h, BLOCK_D=block_d,
        INTERLEAVED=bool(interleaved), EXACT_CAST=interpreting(), enable_fp_fusion=False,
        num_warps=norm_num_warps(block_r),  # the sum of squares in rms_norm's order: equal results
    )  # fmt: skip


__all__ = ["mla_latent_write"]
