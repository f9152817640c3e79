"""Triton varlen attention forward (FlashAttention-2 style) for non-absorbed MLA prefill.

Contract: ``tokenspeed_kernels.ops.mla.mla_prefill`` (q ``[Tq, H, Dqk]``, k ``[Tk, Hk, Dqk]``,
v ``[Tk, Hk, Dv]``, packed sequences, separate q / kv lengths, causal bottom-right aligned).
Design, and why:

* One program = one (sequence, head, BLOCK_M query rows) tile; GQA maps head h to kv head
  h // (H // Hk). The qk dim is split into two power-of-two parts (DeepSeek 192 = 128 + 64,
  Llama 64 = 64 + 0) because tl.arange needs powers of two; both dots accumulate into one
  fp32 score tile.
* Online softmax in the exp2 domain: the scale is multiplied by log2(e) once, so each score
  costs one FMA and one exp2; lse is converted back to the natural log at the end.
* The key loop runs in two parts: tiles that no row of the q tile masks (no causal diagonal,
  no sequence end) without any mask arithmetic, then at most a few diagonal/edge tiles with
  the mask. Causal tiles entirely above the diagonal are never visited.
* Grid (batch * heads, q tiles): the tile axis is the slow one, and tile rank 0 is each
  sequence's *last* q tile when causal (the one that sees the most keys), so the heaviest
  work is issued first and the light tiles fill the tail of the last wave.
* No host sync: lengths are read on the device; ``max_seqlen_q`` (a host int from the
  caller) bounds the grid, and programs past a sequence's tiles exit at once. Graph-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenspeed_kernels.triton.rounding import interpreting as _interpreting


@dataclass(frozen=True)
class MlaPrefillConfig:
    block_m: int  # query rows per program (>= 16 for tl.dot)
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int  # software-pipelining depth of the key loop


def default_config(head_dim_qk: int, head_dim_v: int, max_seqlen_q: int) -> MlaPrefillConfig:
    """Hopper/Ampere defaults (untuned on the device yet; ``bench_mla_prefill.py --sweep``).

    128 x 64 with 8 warps is the FA2 tile for head dims up to 192: the fp32 accumulator
    (128 x 128 / 256 threads = 64 regs) plus the score tile (32 regs) fit without spilling.
    Small heads (<= 64) afford more stages. Short queries shrink BLOCK_M so a 1-token
    chunk does not compute 127 dead rows.
    """
    block_m = min(128, max(16, triton.next_power_of_2(max(1, max_seqlen_q))))
    if head_dim_qk <= 64 and head_dim_v <= 64:
        return MlaPrefillConfig(block_m, 64, 4 if block_m <= 64 else 8, 3)
    return MlaPrefillConfig(block_m, 64, 4 if block_m <= 64 else 8, 2)


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}



def split_head_dim(dim: int) -> tuple[int, int]:
    """dim = d1 + d2 with d1 the largest power of two <= dim and d2 a power of two or 0."""
    d1 = 1 << (dim.bit_length() - 1)
    d2 = dim - d1
    if d1 < 16 or (d2 and (d2 < 16 or d2 & (d2 - 1))):
        raise ValueError(f"mla_prefill[triton]: head_dim_qk = {dim} must be a power of two >= 16 or a sum of two")
    return d1, d2


@triton.jit
def _attend_tile(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0, key_end, row_end, qk_scale,
                 offs_n, offs_d1, offs_d2, offs_dv,
                 D2: tl.constexpr, MASKED: tl.constexpr, DOT_F32: tl.constexpr, P_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):  # fmt: skip
    keys = n0 + offs_n
    kt = keys.to(tl.int64)
    if MASKED:
        n_ok = keys < key_end
        k1 = tl.load(k_base + kt[:, None] * stride_kt + offs_d1[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_base + kt[:, None] * stride_vt + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
    else:
        k1 = tl.load(k_base + kt[:, None] * stride_kt + offs_d1[None, :])
        v = tl.load(v_base + kt[:, None] * stride_vt + offs_dv[None, :])
    if DOT_F32:
        k1 = k1.to(tl.float32)
    qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
    if D2 > 0:
        if MASKED:
            k2 = tl.load(k_base + kt[:, None] * stride_kt + offs_d2[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k2 = tl.load(k_base + kt[:, None] * stride_kt + offs_d2[None, :])
        if DOT_F32:
            k2 = k2.to(tl.float32)
        qk = tl.dot(q2, tl.trans(k2), acc=qk, input_precision=DOT_PRECISION)
    if MASKED:
        # row_end[r]: first key row r may not see (causal diagonal and sequence end).
        s = tl.where(keys[None, :] < row_end[:, None], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # p rounds to the inputs' 16-bit type as on the tensor cores, also under DOT_F32.
    if DOT_F32:
        acc = tl.dot(p.to(P_DTYPE).to(tl.float32), v.to(tl.float32), acc=acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc=acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _mla_prefill_kernel(
    Q, K, V, CU_Q, CU_K, OUT, LSE, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt,
    heads, group,
    D1: tl.constexpr, D2: tl.constexpr, D2P: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, P_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    rank = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    q0 = tl.load(CU_Q + b)
    lq = tl.load(CU_Q + b + 1) - q0
    k0 = tl.load(CU_K + b)
    lk = tl.load(CU_K + b + 1) - k0
    n_tiles = tl.cdiv(lq, BLOCK_M)
    if rank >= n_tiles:
        return
    if CAUSAL:
        m_tile = n_tiles - 1 - rank  # the last q tile sees the most keys: issue it first
    else:
        m_tile = rank

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < lq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d1 = tl.arange(0, D1)
    offs_d2 = D1 + tl.arange(0, D2P)  # D2P = max(D2, 16): unused when D2 == 0
    offs_dv = tl.arange(0, DV)

    q_rows = (q0 + offs_m).to(tl.int64) * stride_qt + h * stride_qh
    q1 = tl.load(Q + q_rows[:, None] + offs_d1[None, :], mask=row_ok[:, None], other=0.0)
    if D2 > 0:
        q2 = tl.load(Q + q_rows[:, None] + offs_d2[None, :], mask=row_ok[:, None], other=0.0)
    else:
        q2 = q1  # placeholder, never read
    if DOT_F32:
        # The interpreter's tl.dot mishandles 16-bit floats; an exact fp32 upcast computes
        # the same products with fp32 accumulation, as the tensor cores do.
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)

    kvh = (h // group).to(tl.int64)
    k_base = K + k0.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = V + k0.to(tl.int64) * stride_vt + kvh * stride_vh
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain

    if CAUSAL:
        # Bottom-right: row i sees keys j <= lk - lq + i. key_end: keys any row of the tile sees.
        shift = lk - lq
        row_end = tl.minimum(lk, shift + offs_m + 1)
        key_end = tl.maximum(0, tl.minimum(lk, shift + tl.minimum(m_tile * BLOCK_M + BLOCK_M, lq)))
        # Keys every row of the tile sees (the first row's limit), in whole tiles.
        full_end = (tl.maximum(0, tl.minimum(lk, shift + m_tile * BLOCK_M + 1)) // BLOCK_N) * BLOCK_N
    else:
        row_end = tl.zeros([BLOCK_M], dtype=tl.int32) + lk
        key_end = lk
        full_end = (lk // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0, key_end, row_end,
                                     qk_scale, offs_n, offs_d1, offs_d2, offs_dv, D2, False, DOT_F32, P_DTYPE,
                                     DOT_PRECISION)  # fmt: skip
    for n0 in range(full_end, key_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q1, q2, k_base, v_base, stride_kt, stride_vt, n0, key_end, row_end,
                                     qk_scale, offs_n, offs_d1, offs_d2, offs_dv, D2, True, DOT_F32, P_DTYPE,
                                     DOT_PRECISION)  # fmt: skip

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_rows = (q0 + offs_m).to(tl.int64) * stride_ot + h * stride_oh
    tl.store(OUT + o_rows[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (q0 + offs_m).to(tl.int64) * stride_lt + h, lse, mask=row_ok)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor) -> None:
    name = "mla_prefill[triton]"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{name}: q, k, v must be 3-D, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _TL_DTYPE:
        raise ValueError(f"{name}: dtype {q.dtype} not supported (bf16, fp16; fp32 for tests)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: k ({k.dtype}) and v ({v.dtype}) must have q's dtype {q.dtype}")
    if k.shape[2] != q.shape[2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{name}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: heads {q.shape[1]} must be a multiple of kv_heads {k.shape[1]}")
    split_head_dim(q.shape[2])
    dv = v.shape[2]
    if dv < 16 or dv & (dv - 1):
        raise ValueError(f"{name}: head_dim_v = {dv} must be a power of two >= 16")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"{name}: q, k and v need a contiguous last dimension")
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32 or cu_q.dim() != 1 or cu_q.shape != cu_k.shape:
        raise ValueError(f"{name}: cu_seqlens_q / cu_seqlens_k must be int32 [batch + 1] of equal length")
    if not (q.device == k.device == v.device == cu_q.device == cu_k.device):
        raise ValueError(f"{name}: all tensors must be on one device")


def mla_prefill_with_config(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool = True,
    *,
    config: MlaPrefillConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mla_prefill`` with an explicit tile config (benchmarks, tests)."""
    del max_seqlen_k  # the key loop reads each sequence's length on the device
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    heads, dqk, dv = q.shape[1], q.shape[2], v.shape[2]
    out = torch.empty(q.shape[0], heads, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], heads, dtype=torch.float32, device=q.device)
    batch = cu_seqlens_q.numel() - 1
    if batch <= 0 or max_seqlen_q <= 0 or q.shape[0] == 0:
        return out, lse
    cfg = config or default_config(dqk, dv, max_seqlen_q)
    d1, d2 = split_head_dim(dqk)
    interp = _interpreting()
    grid = (batch * heads, triton.cdiv(max_seqlen_q, cfg.block_m))
    _mla_prefill_kernel[grid](
        q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, float(softmax_scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), heads, heads // k.shape[1],
        D1=d1, D2=d2, D2P=max(d2, 16), DV=dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=bool(causal),
        DOT_F32=interp or q.dtype == torch.float32, P_DTYPE=_TL_DTYPE[q.dtype],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or interp else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def mla_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Registry entry point; same signature and semantics as ``tokenspeed_kernels.ops.mla.mla_prefill``."""
    return mla_prefill_with_config(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)


__all__ = ["MlaPrefillConfig", "default_config", "mla_prefill", "mla_prefill_with_config", "split_head_dim"]
