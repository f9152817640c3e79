"""Triton split-KV MLA decode: absorbed DeepSeek attention over a paged latent KV cache.

Contract: ``tokenspeed_kernels.ops.mla.mla_decode`` (q ``[B, q_len, H, 576]``, one latent
KV head, values = the first 512 key dims). Design, and why:

* The q_len new tokens are folded into the row axis (row = i * H + h, q's own memory order),
  so 16 heads with q_len 4 make one 64-row block that reads each KV tile once.
* One KV tile ``[BLOCK_N, 576]`` is loaded per step; its first 512 columns are both the key
  part for q.k and the value tile for p.v, so the cache is read once (bandwidth is the roof
  for up to ~138 rows).
* Split-KV without host sync: the grid has a fixed ``num_splits`` chosen from shapes and the
  SM count only; each split program derives its token range from ``cache_seqlens`` on the
  device and exits when the range is empty. The combine kernel re-derives the number of
  active splits the same way (``split_chunk``) and merges partial (out, lse) in fp32.
  Everything is CUDA-graph capturable: no ``.item()``, no branch on tensor values.
* With one split (shape-decided), the split kernel writes the final output directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenspeed_kernels.ops.kv_cache import check_fp8_kv_scale
from tokenspeed_kernels.triton.mla_decode_combine import mla_decode_combine, split_chunk
from tokenspeed_kernels.triton.rounding import interpreting as _interpreting


@dataclass(frozen=True)
class MlaDecodeConfig:
    block_h: int  # query rows (i, h pairs) per program; >= 16 for tl.dot
    block_n: int  # KV tokens per loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the KV loop
    programs_per_sm: int  # resident programs per SM at this tile's registers/smem (split target)
    min_split_tokens: int  # on the device, no split gets fewer tokens (q load + partial write overhead)
    max_splits: int = 256  # bounds the partial buffers and the combine's tile


def default_config(rows: int, kv_dtype: torch.dtype) -> MlaDecodeConfig:
    """H100 defaults by row count. ptxas (sm_90) figures, none of which spill:
    (16, 32, 4 warps, 3 stages) 186 regs, 56 KB smem -> 2 programs/SM; (32, 32, 8, 3) 204 regs,
    76 KB -> 1/SM; (64, 32, 8, 2) 255 regs, 147 KB, wgmma -> 1/SM. 64-row tiles with 4 warps,
    or 16/32-row tiles with BLOCK_N = 64 and 4 warps, spill. With an fp8 cache the 64-row tile
    spills (the e4m3 -> bf16 conversion), so fp8 stays at 32 rows.
    """
    if rows <= 16:
        return MlaDecodeConfig(16, 32, 4, 3, 2, 256)
    if rows <= 32 or kv_dtype == torch.float8_e4m3fn:
        return MlaDecodeConfig(32, 32, 8, 3, 1, 256)
    return MlaDecodeConfig(64, 32, 8, 2, 1, 256)


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}



@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter on the CPU: small, so the tests exercise several splits


def num_splits_for(batch: int, row_blocks: int, max_tokens: int, cfg: MlaDecodeConfig, sm_count: int) -> int:
    """Grid splits per sequence from shapes only (max_tokens = block-table columns x page size).

    Wave-efficiency rule (as flash-attn's num_splits heuristic): enough programs already
    -> 1; else the fewest splits whose last wave is >= 85% as full as the best choice's.
    Short sequences use fewer splits on the device (``min_split_tokens``).
    """
    slots = sm_count * cfg.programs_per_sm
    blocks = max(1, batch * row_blocks)
    if blocks >= 0.8 * slots:
        return 1
    cap = max(1, min(cfg.max_splits, max_tokens // cfg.min_split_tokens, slots))
    eff = [(blocks * s / slots) / -(-blocks * s // slots) for s in range(1, cap + 1)]
    best = max(eff)
    return next(s for s, e in enumerate(eff, start=1) if e >= 0.85 * best)


@dataclass(frozen=True)
class SplitPlan:
    """The grid and output buffers of one split-KV launch (shared by the bf16 and fp8 kernels)."""

    block_h: int
    row_blocks: int
    num_splits: int
    o_buf: torch.Tensor  # the final out (one split) or fp32 partials [B, rows, splits, DV]
    l_buf: torch.Tensor
    o_strides: tuple[int, int, int]  # (batch, row, split) strides of o_buf
    l_strides: tuple[int, int, int]

    @property
    def final(self) -> bool:
        return self.num_splits == 1


def plan_splits(out: torch.Tensor, lse: torch.Tensor, block_table: torch.Tensor, page_size: int,
                cfg: MlaDecodeConfig, num_splits: int | None) -> SplitPlan:  # fmt: skip
    """Row tiling and split count (shape-decided, see ``num_splits_for``); with one split the
    kernel writes ``out``/``lse`` directly, else into fp32 partials the combine merges."""
    batch, q_len, heads, head_dim_v = out.shape
    rows = q_len * heads
    block_h = min(cfg.block_h, max(16, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, block_h)
    if num_splits is None:
        max_tokens = block_table.shape[1] * page_size
        num_splits = num_splits_for(batch, row_blocks, max_tokens, cfg, _sm_count(out.device))
    if num_splits == 1:
        return SplitPlan(block_h, row_blocks, 1, out, lse, (rows * head_dim_v, head_dim_v, 0), (rows, 1, 0))
    # fp32 partials [B, rows, splits, DV]: a row's splits are adjacent for the combine.
    o_buf = torch.empty(batch, rows, num_splits, head_dim_v, dtype=torch.float32, device=out.device)
    l_buf = torch.empty(batch, rows, num_splits, dtype=torch.float32, device=out.device)
    return SplitPlan(block_h, row_blocks, num_splits, o_buf, l_buf, o_buf.stride()[:3], l_buf.stride())


def finish_splits(plan: SplitPlan, cache_seqlens: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  cfg: MlaDecodeConfig) -> None:  # fmt: skip
    """Merge the partials of a multi-split launch into ``out``/``lse`` (nothing for one split)."""
    if not plan.final:
        mla_decode_combine(plan.o_buf, plan.l_buf, cache_seqlens, out, lse, cfg.min_split_tokens, cfg.block_n)


@triton.jit
def _row_block(pid_r, heads, q_len, rows, seqlen, end, BLOCK_H: tl.constexpr, CAUSAL: tl.constexpr):
    """This program's query rows (row = i * heads + h) and where their keys end.

    Returns (offs_r, row_ok, qi, qh, row_end, blk_end): ``row_end`` per row, ``blk_end`` the
    last key any row of the block sees (the loop bound). Bottom-right causal: query i sees
    keys < seqlen - q_len + i + 1.
    """
    offs_r = pid_r * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = offs_r < rows
    qi = offs_r // heads
    qh = offs_r % heads
    if CAUSAL:
        row_end = tl.minimum(end, seqlen - q_len + qi + 1)
        last_i = tl.minimum(q_len - 1, (pid_r * BLOCK_H + BLOCK_H - 1) // heads)
        blk_end = tl.minimum(end, seqlen - q_len + last_i + 1)
    else:
        row_end = tl.zeros([BLOCK_H], dtype=tl.int32) + end
        blk_end = end
    return offs_r, row_ok, qi, qh, row_end, blk_end


@triton.jit
def _softmax_step(qk, m_i, l_i, acc):
    """One online-softmax step on exp2-domain scores: (p, new max, new sum, rescaled acc)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _store_split(OUT, LSE, b, split, offs_r, row_ok, offs_dv, acc, m_i, l_i, KV_SCALE,
                 stride_ob, stride_or, stride_os, stride_lb, stride_lr, stride_ls, SCALE_OUT: tl.constexpr):  # fmt: skip
    """Normalise and write one split's (out, lse); rows with no key get out 0, lse -inf.
    ``SCALE_OUT``: multiply by the fp8 cache's scale (values are the dequantised cache)."""
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    if SCALE_OUT:
        out = out * tl.load(KV_SCALE)
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptr = OUT + b * stride_ob + offs_r[:, None].to(tl.int64) * stride_or + split * stride_os + offs_dv[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * stride_lb + offs_r * stride_lr + split * stride_ls, lse, mask=row_ok)


@triton.jit
def _mla_decode_split_kernel(
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
    KV_FP8: tl.constexpr,
    DOT_F32: tl.constexpr,
    P_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    seqlen = tl.load(SEQLENS + b)
    chunk = split_chunk(seqlen, num_splits, min_chunk, BLOCK_N)
    start = split * chunk
    if not WRITE_FINAL:
        # Inactive split: the combine kernel reads only cdiv(seqlen, chunk) splits.
        if start >= seqlen:
            return
    end = tl.minimum(start + chunk, seqlen)

    offs_r, row_ok, qi, qh, row_end, blk_end = _row_block(pid_r, heads, q_len, rows, seqlen, end, BLOCK_H, CAUSAL)

    offs_dv = tl.arange(0, DV)
    offs_pe = DV + tl.arange(0, DPE)
    q_ptr = Q + b * stride_qb + qi.to(tl.int64) * stride_qi + qh * stride_qh
    q_nope = tl.load(q_ptr[:, None] + offs_dv[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_ptr[:, None] + offs_pe[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        # The interpreter's tl.dot mishandles 16-bit floats; an exact fp32 upcast computes
        # the same products with fp32 accumulation, as the tensor cores do.
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
    if KV_FP8:
        kv_scale = tl.load(KV_SCALE)
        qk_scale = qk_scale * kv_scale

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, DV], dtype=tl.float32)
    bt_row = BT + b * stride_btb
    for n0 in range(start, blk_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < blk_end  # masked slots read as 0: unused cache memory may hold NaN
        page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0)
        tok = page.to(tl.int64) * stride_kp + (offs_n % PAGE_SIZE) * stride_kt
        k_nope = tl.load(KV + tok[:, None] + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
        k_pe = tl.load(KV + tok[:, None] + offs_pe[None, :], mask=n_ok[:, None], other=0.0)
        if KV_FP8 or DOT_F32:
            k_nope = k_nope.to(q_nope.dtype)
            k_pe = k_pe.to(q_nope.dtype)
        qk = tl.dot(q_nope, tl.trans(k_nope), input_precision=DOT_PRECISION)
        qk = tl.dot(q_pe, tl.trans(k_pe), acc=qk, input_precision=DOT_PRECISION)
        qk = tl.where(offs_n[None, :] < row_end[:, None], qk * qk_scale, float("-inf"))
        p, m_new, l_i, acc = _softmax_step(qk, m_i, l_i, acc)
        # p rounds to the cache's 16-bit type as on the tensor cores, also under DOT_F32.
        acc = tl.dot(p.to(P_DTYPE).to(k_nope.dtype), k_nope, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    _store_split(OUT, LSE, b, split, offs_r, row_ok, offs_dv, acc, m_i, l_i, KV_SCALE,
                 stride_ob, stride_or, stride_os, stride_lb, stride_lr, stride_ls, KV_FP8)  # fmt: skip


def _check(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
           head_dim_v: int, kv_scale: torch.Tensor | None) -> None:
    if q.dim() != 4 or kv_cache.dim() != 3:
        raise ValueError(f"mla_decode[triton]: q must be 4-D and kv_cache 3-D, got {tuple(q.shape)}, {tuple(kv_cache.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"mla_decode[triton]: q dtype {q.dtype} not supported (bf16, fp16; fp32 for tests)")
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if kv_cache.dtype != q.dtype and not fp8:
        raise ValueError(f"mla_decode[triton]: kv_cache dtype {kv_cache.dtype} must equal q's {q.dtype} or be float8_e4m3fn")
    if fp8:
        check_fp8_kv_scale("mla_decode[triton]", kv_scale)
    dim, dpe = q.shape[-1], q.shape[-1] - head_dim_v
    if kv_cache.shape[-1] != dim:
        raise ValueError(f"mla_decode[triton]: head_dim of q ({dim}) and kv_cache ({kv_cache.shape[-1]}) differ")
    for name, v in (("head_dim_v", head_dim_v), ("head_dim - head_dim_v", dpe), ("page_size", kv_cache.shape[1])):
        if v < 16 or v & (v - 1):
            raise ValueError(f"mla_decode[triton]: {name} = {v} must be a power of two >= 16")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("mla_decode[triton]: q and kv_cache need a contiguous last dimension")
    if block_table.dtype != torch.int32 or cache_seqlens.dtype != torch.int32:
        raise ValueError("mla_decode[triton]: block_table and cache_seqlens must be int32")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0] or cache_seqlens.shape != (q.shape[0],):
        raise ValueError(
            f"mla_decode[triton]: block_table {tuple(block_table.shape)} / cache_seqlens {tuple(cache_seqlens.shape)} "
            f"do not match batch {q.shape[0]}"
        )
    if block_table.stride(1) != 1:
        raise ValueError("mla_decode[triton]: block_table needs a contiguous last dimension")
    if not (q.device == kv_cache.device == block_table.device == cache_seqlens.device):
        raise ValueError("mla_decode[triton]: all tensors must be on one device")


def mla_decode_with_config(
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
    """``mla_decode`` with an explicit tile config / split count (benchmarks, tests)."""
    _check(q, kv_cache, block_table, cache_seqlens, head_dim_v, kv_scale)
    batch, q_len, heads, dim = q.shape
    rows = q_len * heads
    page_size = kv_cache.shape[1]
    out = torch.empty(batch, q_len, heads, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_len, heads, dtype=torch.float32, device=q.device)
    if batch == 0 or rows == 0:
        return out, lse
    cfg = config or default_config(rows, kv_cache.dtype)
    plan = plan_splits(out, lse, block_table, page_size, cfg, num_splits)
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    _mla_decode_split_kernel[(plan.row_blocks, plan.num_splits, batch)](
        q, kv_cache, block_table, cache_seqlens, kv_scale if fp8 else cache_seqlens,
        plan.o_buf, plan.l_buf, float(softmax_scale),
        q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        heads, q_len, rows, plan.num_splits, cfg.min_split_tokens, *plan.o_strides, *plan.l_strides,
        DV=head_dim_v, DPE=dim - head_dim_v, PAGE_SIZE=page_size, BLOCK_H=plan.block_h, BLOCK_N=cfg.block_n,
        CAUSAL=bool(causal), WRITE_FINAL=plan.final, KV_FP8=fp8,
        DOT_F32=_interpreting() or q.dtype == torch.float32, P_DTYPE=_TL_DTYPE[q.dtype],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or _interpreting() else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    finish_splits(plan, cache_seqlens, out, lse, cfg)
    return out, lse


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    head_dim_v: int = 512,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry entry point; same signature and semantics as ``tokenspeed_kernels.ops.mla.mla_decode``.

    An fp8 cache goes to the fp8 kernel (``mla_decode_fp8.py``: fp16 dots, register prefetch);
    this module's own ``KV_FP8`` path (bf16 dequantisation) stays reachable through
    ``mla_decode_with_config`` for comparison.
    """
    if kv_cache.dtype == torch.float8_e4m3fn:
        from tokenspeed_kernels.triton.mla_decode_fp8 import mla_decode_fp8

        return mla_decode_fp8(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, head_dim_v, kv_scale)
    return mla_decode_with_config(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, head_dim_v, kv_scale)


__all__ = [
    "MlaDecodeConfig",
    "SplitPlan",
    "default_config",
    "finish_splits",
    "mla_decode",
    "mla_decode_with_config",
    "num_splits_for",
    "plan_splits",
]
