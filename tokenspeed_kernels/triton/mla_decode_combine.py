"""Combine step of the Triton split-KV MLA decode: merge partial (out, lse) by LSE in fp32.

The split kernel writes partials only for the splits that hold tokens; this kernel
re-derives how many those are from ``cache_seqlens`` with the same ``split_chunk``, so no
host-side count (and no sync) is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def split_chunk(seqlen, num_splits, min_chunk, BLOCK_N: tl.constexpr):
    """Tokens per split: max(seqlen / num_splits, min_chunk) in whole BLOCK_N steps (>= BLOCK_N).

    A sequence shorter than num_splits * min_chunk thus uses fewer splits than the grid has:
    the per-sequence split count is decided here, on the device, from its length.
    """
    per = tl.maximum(tl.cdiv(seqlen, num_splits), min_chunk)
    return tl.maximum(tl.cdiv(per, BLOCK_N), 1) * BLOCK_N


@triton.jit
def _mla_decode_combine_kernel(
    MID_O,
    MID_LSE,
    SEQLENS,
    OUT,
    LSE,
    rows,
    num_splits,
    min_chunk,
    stride_mb,
    stride_mr,
    stride_ms,
    stride_lb,
    stride_lr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pd = tl.program_id(2)
    seqlen = tl.load(SEQLENS + b)
    active = tl.cdiv(seqlen, split_chunk(seqlen, num_splits, min_chunk, BLOCK_N))

    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < active
    lse_s = tl.load(MID_LSE + b * stride_lb + r * stride_lr + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for splits whose rows saw no key
    total = tl.sum(w, 0)

    offs_d = pd * BLOCK_DV + tl.arange(0, BLOCK_DV)
    o_ptr = MID_O + b * stride_mb + r * stride_mr + offs_s[:, None] * stride_ms + offs_d[None, :]
    parts = tl.load(o_ptr, mask=s_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(OUT + (b * rows + r) * DV + offs_d, out.to(OUT.dtype.element_ty))
    if pd == 0:
        tl.store(LSE + b * rows + r, tl.where(total > 0.0, m + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf")))


def mla_decode_combine(
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    cache_seqlens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    min_chunk: int,
    block_n: int,
) -> None:
    """Merge ``mid_o [B, rows, S, DV]`` / ``mid_lse [B, rows, S]`` into contiguous ``out`` / ``lse``."""
    batch, rows, num_splits, dv = mid_o.shape
    block_s = triton.next_power_of_2(num_splits)
    # Keep each program's [splits, dims] tile near 8K fp32 values (registers), and give
    # batch-1 decode enough programs to read the partials in parallel.
    block_dv = max(16, min(dv, 8192 // block_s))
    _mla_decode_combine_kernel[(rows, batch, dv // block_dv)](
        mid_o, mid_lse, cache_seqlens, out, lse, rows, num_splits, min_chunk,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        DV=dv, BLOCK_DV=block_dv, BLOCK_S=block_s, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
