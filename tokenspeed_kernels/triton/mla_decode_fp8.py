"""Triton split-KV MLA decode over an fp8 (e4m3fn) latent cache with a per-tensor scale.

Contract: ``tokenspeed_kernels.ops.mla.mla_decode`` with ``kv_cache`` float8_e4m3fn and
``kv_scale`` float32 ``[1]``: the result equals attention over ``kv_cache.float() * kv_scale``.
Same row fold (row = i * heads + h), split-KV scheduling on the device, causal bottom-right
mask and LSE combine as the bf16 kernel (``mla_decode.py``); what differs, and why:

* The cache is read as fp8 (half the bytes of bf16: decode time at long context is KV bytes
  over bandwidth) and widened in registers to **fp16**, not bf16: every e4m3 value is exact in
  fp16, and e4m3 -> f16 is one ``cvt.rn.f16x2.e4m3x2`` per two values, where -> bf16 needs two
  more conversions per pair. The dots then run on fp16 tensor cores with fp32 accumulation.
* fp16 has a narrow range (max 65504), so each query row is multiplied by a power of two that
  puts its largest |value| in [2^13, 2^14) before the cast to fp16. The power of two is exact,
  and so is the cast of a bf16 query (fp16 has more mantissa bits), barring values below 2^-28
  of the row's maximum; the row's score is multiplied back by the inverse power of two.
* The scale is folded, not applied per element: scores use ``softmax_scale * kv_scale`` and the
  output is multiplied by ``kv_scale`` once at the end. Probabilities round to fp16 for the
  p.v dot (finer than bf16's 8 bits).
* Register double buffering (``prefetch``): Triton's software pipeliner does not take the
  fp8 tile (it feeds two dots in two register layouts, and 8-bit ldmatrix.trans does not exist
  on sm_90), so without help each step would wait for its own load. With ``prefetch`` the next
  tile's bytes are requested before this tile's math.
* bf16 dots (``dot_fp16=False``, no row scaling then) stay selectable so the benchmark's sweep
  can compare the two conversions on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenspeed_kernels.ops.kv_cache import check_fp8_kv_scale
from tokenspeed_kernels.triton.mla_decode import (
    MlaDecodeConfig,
    _row_block,
    _softmax_step,
    _store_split,
    finish_splits,
    plan_splits,
)
from tokenspeed_kernels.triton.mla_decode_combine import split_chunk
from tokenspeed_kernels.triton.rounding import interpreting as _interpreting

FP16_ROW_MAX_LOG2: tl.constexpr = tl.constexpr(13)  # query rows are scaled so that max |q| lies in [2^13, 2^14)


@dataclass(frozen=True)
class MlaDecodeFp8Config(MlaDecodeConfig):
    prefetch: bool = True  # register double buffering of the KV tile (see the kernel)
    dot_fp16: bool = True  # fp16 tensor-core inputs with power-of-two row scaling; False: bf16


def default_fp8_config(rows: int) -> MlaDecodeFp8Config:
    """Tile by row count, chosen from sm_90a SASS of this kernel (Triton 3.8 + ptxas, offline):

    * <= 16 rows: 16 x 64 tokens, 8 warps, prefetch: no spill, about 117 warp instructions per
      token (8 warps x 939 per 64-token step) against 99 for the bf16 kernel's 16 x 32 tile;
      the fp8 tile being half the bytes, this is the case where instruction issue, not DRAM,
      can become the limit. 255 registers x 256 threads: one program per SM.
    * more rows: 32 x 32, 8 warps, no prefetch (with prefetch the 32-row tile spills; so do the
      64-row wgmma tiles, with or without it).
    ``benchmarks/bench_mla_decode.py --kv-dtype fp8 --sweep`` times the alternatives on the device.
    """
    if rows <= 16:
        return MlaDecodeFp8Config(16, 64, 8, 2, 1, 256, prefetch=True)
    return MlaDecodeFp8Config(32, 32, 8, 3, 1, 256, prefetch=False)


@triton.jit
def _row_pow2(amax):
    """(multiplier, inverse) powers of two that bring a row's max |q| into [2^13, 2^14).

    Built from the fp32 exponent field, so both are exact; amax = 0 (an all-zero or masked row)
    takes the clamped exponent and stays 0 after scaling.
    """
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(amax)) for normal amax
    e = tl.minimum(tl.maximum(e, -100), 100)
    shift = FP16_ROW_MAX_LOG2 - e
    mul = ((shift + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - shift) << 23).to(tl.float32, bitcast=True)
    return mul, inv


@triton.jit
def _load_fp8_tile(KV, bt_row, n0, n_end, stride_kp, stride_kt, offs_dv, offs_pe, PAGE_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
    """fp8 bytes of tokens n0 .. n0 + BLOCK_N (latent part, rope part); slots >= n_end read as 0
    (unused cache memory may hold NaN)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0)
    tok = page.to(tl.int64) * stride_kp + (offs_n % PAGE_SIZE) * stride_kt
    k_nope = tl.load(KV + tok[:, None] + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
    k_pe = tl.load(KV + tok[:, None] + offs_pe[None, :], mask=n_ok[:, None], other=0.0)
    return k_nope, k_pe


@triton.jit
def _mla_decode_fp8_split_kernel(
    Q,
    KV,
    BT,
    SEQLENS,
    KV_SCALE,
    OUT,
    LSE,
    sm_scale,
    stride_qb,
    stride_qi,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_btb,
    heads,
    q_len,
    rows,
    num_splits,
    min_chunk,
    stride_ob,
    stride_or,
    stride_os,
    stride_lb,
    stride_lr,
    stride_ls,
    DV: tl.constexpr,
    DPE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WRITE_FINAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.float16 or tl.bfloat16: the tensor-core input type
    ROW_POW2: tl.constexpr,  # scale query rows by powers of two (needed for fp16's range)
    DOT_F32: tl.constexpr,  # interpreter: exact fp32 upcast of the 16-bit tiles before tl.dot
    DOT_PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,  # register double buffering of the KV tile
):
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    seqlen = tl.load(SEQLENS + b)
    chunk = split_chunk(seqlen, num_splits, min_chunk, BLOCK_N)
    start = split * chunk
    if not WRITE_FINAL:
        if start >= seqlen:  # inactive split: the combine reads only cdiv(seqlen, chunk) splits
            return
    end = tl.minimum(start + chunk, seqlen)

    offs_r, row_ok, qi, qh, row_end, blk_end = _row_block(pid_r, heads, q_len, rows, seqlen, end, BLOCK_H, CAUSAL)

    offs_dv = tl.arange(0, DV)
    offs_pe = DV + tl.arange(0, DPE)
    q_ptr = Q + b * stride_qb + qi.to(tl.int64) * stride_qi + qh * stride_qh
    q_nope = tl.load(q_ptr[:, None] + offs_dv[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_pe = tl.load(q_ptr[:, None] + offs_pe[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634 * tl.load(KV_SCALE)  # exp2 domain, dequantisation folded in
    row_scale = tl.full([BLOCK_H], 1.0, dtype=tl.float32)
    if ROW_POW2:
        amax = tl.maximum(tl.max(tl.abs(q_nope), 1), tl.max(tl.abs(q_pe), 1))
        mul, row_scale = _row_pow2(amax)
        q_nope = q_nope * mul[:, None]
        q_pe = q_pe * mul[:, None]
    q_nope = q_nope.to(DOT_DTYPE)
    q_pe = q_pe.to(DOT_DTYPE)
    if DOT_F32:
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    row_qk_scale = row_scale * qk_scale

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DV], dtype=tl.float32)
    bt_row = BT + b * stride_btb
    # Register double buffering: the next tile's fp8 bytes are requested before this tile's
    # math, so one tile is always in flight per program. (Triton's own pipeliner does not take
    # this load: the tile feeds two dots in two register layouts.)
    if PREFETCH:
        kn_next, kp_next = _load_fp8_tile(KV, bt_row, start, blk_end, stride_kp, stride_kt, offs_dv, offs_pe, PAGE_SIZE, BLOCK_N)
    for n0 in range(start, blk_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if PREFETCH:
            k_nope = kn_next.to(DOT_DTYPE)
            k_pe = kp_next.to(DOT_DTYPE)
            kn_next, kp_next = _load_fp8_tile(
                KV, bt_row, n0 + BLOCK_N, blk_end, stride_kp, stride_kt, offs_dv, offs_pe, PAGE_SIZE, BLOCK_N
            )
        else:
            k_nope, k_pe = _load_fp8_tile(KV, bt_row, n0, blk_end, stride_kp, stride_kt, offs_dv, offs_pe, PAGE_SIZE, BLOCK_N)
            k_nope = k_nope.to(DOT_DTYPE)
            k_pe = k_pe.to(DOT_DTYPE)
        if DOT_F32:
            k_nope = k_nope.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        qk = tl.dot(q_nope, tl.trans(k_nope), input_precision=DOT_PRECISION)
        qk = tl.dot(q_pe, tl.trans(k_pe), acc=qk, input_precision=DOT_PRECISION)
        qk = tl.where(offs_n[None, :] < row_end[:, None], qk * row_qk_scale[:, None], float("-inf"))
        p, m_new, l_i, acc = _softmax_step(qk, m_i, l_i, acc)
        p = p.to(DOT_DTYPE)  # as the tensor cores see it, also in the interpreter
        if DOT_F32:
            p = p.to(tl.float32)
        acc = tl.dot(p, k_nope, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # values are the dequantised cache too: the output takes the scale once
    _store_split(OUT, LSE, b, split, offs_r, row_ok, offs_dv, acc, m_i, l_i, KV_SCALE,
                 stride_ob, stride_or, stride_os, stride_lb, stride_lr, stride_ls, True)  # fmt: skip


def _pow2_at_least_16(name: str, v: int) -> None:
    if v < 16 or v & (v - 1):
        raise ValueError(f"mla_decode[triton fp8]: {name} = {v} must be a power of two >= 16")


def check_fp8_args(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    kv_scale: torch.Tensor | None,
) -> None:
    """Validate the fp8 variant's arguments; every message names the argument at fault."""
    op = "mla_decode[triton fp8]"
    if kv_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{op}: kv_cache must be torch.float8_e4m3fn, got {kv_cache.dtype}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{op}: q must be bfloat16/float16 (float32 for tests), got {q.dtype}")
    check_fp8_kv_scale(op, kv_scale)
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError(f"{op}: an e4m3 cache needs compute capability >= 8.9 (hardware fp8 conversion)")
    if q.dim() != 4 or kv_cache.dim() != 3:
        raise ValueError(f"{op}: q must be 4-D and kv_cache 3-D, got {tuple(q.shape)} and {tuple(kv_cache.shape)}")
    if kv_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: kv_cache.shape[2] ({kv_cache.shape[-1]}) must equal q.shape[3] ({q.shape[-1]})")
    _pow2_at_least_16("head_dim_v", head_dim_v)
    _pow2_at_least_16("head_dim - head_dim_v", q.shape[-1] - head_dim_v)
    _pow2_at_least_16("page_size (kv_cache.shape[1])", kv_cache.shape[1])
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: q must be contiguous in its last dimension, got strides {q.stride()}")
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"{op}: kv_cache must be contiguous in its last dimension, got strides {kv_cache.stride()}")
    if block_table.dtype != torch.int32:
        raise ValueError(f"{op}: block_table must be torch.int32, got {block_table.dtype}")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"{op}: cache_seqlens must be torch.int32, got {cache_seqlens.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: block_table must be [batch={q.shape[0]}, max_pages], got {tuple(block_table.shape)}")
    if cache_seqlens.shape != (q.shape[0],):
        raise ValueError(f"{op}: cache_seqlens must be [batch={q.shape[0]}], got {tuple(cache_seqlens.shape)}")
    if block_table.stride(1) != 1:
        raise ValueError(f"{op}: block_table must be contiguous per row")
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens),
                    ("kv_scale", kv_scale)):  # fmt: skip
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}; all inputs must be on one device")


def mla_decode_fp8_with_config(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    head_dim_v: int = 512,
    kv_scale: torch.Tensor | None = None,
    *,
    config: MlaDecodeConfig | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mla_decode`` on an fp8 cache with an explicit tile config / split count (benchmarks,
    tests). A plain ``MlaDecodeConfig`` runs with prefetch and fp16 dots."""
    check_fp8_args(q, kv_cache, block_table, cache_seqlens, head_dim_v, kv_scale)
    batch, q_len, heads, dim = q.shape
    rows = q_len * heads
    page_size = kv_cache.shape[1]
    out = torch.empty(batch, q_len, heads, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_len, heads, dtype=torch.float32, device=q.device)
    if batch == 0 or rows == 0:
        return out, lse
    cfg = config or default_fp8_config(rows)
    plan = plan_splits(out, lse, block_table, page_size, cfg, num_splits)
    fp16 = getattr(cfg, "dot_fp16", True)
    prefetch = getattr(cfg, "prefetch", True)
    _mla_decode_fp8_split_kernel[(plan.row_blocks, plan.num_splits, batch)](
        q, kv_cache, block_table, cache_seqlens, kv_scale, plan.o_buf, plan.l_buf, float(softmax_scale),
        q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        heads, q_len, rows, plan.num_splits, cfg.min_split_tokens, *plan.o_strides, *plan.l_strides,
        DV=head_dim_v, DPE=dim - head_dim_v, PAGE_SIZE=page_size, BLOCK_H=plan.block_h, BLOCK_N=cfg.block_n,
        CAUSAL=bool(causal), WRITE_FINAL=plan.final,
        DOT_DTYPE=tl.float16 if fp16 else tl.bfloat16, ROW_POW2=fp16, DOT_F32=_interpreting(),
        DOT_PRECISION="ieee" if _interpreting() else "tf32", PREFETCH=prefetch,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    finish_splits(plan, cache_seqlens, out, lse, cfg)
    return out, lse


def mla_decode_fp8(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    head_dim_v: int = 512,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and semantics as ``tokenspeed_kernels.ops.mla.mla_decode`` (fp8 cache)."""
    return mla_decode_fp8_with_config(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, head_dim_v, kv_scale)


__all__ = ["MlaDecodeFp8Config", "check_fp8_args", "default_fp8_config", "mla_decode_fp8", "mla_decode_fp8_with_config"]
