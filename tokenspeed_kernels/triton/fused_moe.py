"""Triton fused_moe: permute -> grouped gate/up GEMM + SiLU-and-mul -> grouped down GEMM -> combine.

Contract: ``tokenspeed_kernels.ops.moe.fused_moe``. Pipeline, and why:

* ``moe_align`` sorts the (token, slot) pairs by local expert and pads every expert to the M
  tile, on the device; every M tile then multiplies one expert's weights. Tiles past the
  used ones carry expert -1 and exit, so the grid depends on shapes only (graph-capturable).
* GEMM 1 gathers token rows through the sorted slots (row = slot // top_k) and computes a
  gate tile and the matching up tile in the same program, so SiLU(gate) * up is its epilogue;
  the result is stored in the activation dtype, as the contract requires.
* GEMM 2 reads those rows by slot, multiplies by the routing weight in its epilogue and
  stores fp32 per slot; the combine kernel sums a token's top_k slots in slot order in fp32
  (the reference's order) and casts once. No atomics: the output is deterministic, so a
  CUDA-graph replay equals the eager call bitwise. Slots of other EP ranks are skipped there.
* fp8 (e4m3 weights with 128x128 block scales): activations are quantised per token in
  groups of 128 by ``_quant_fp8_kernel`` (hidden once per token; the intermediate only for
  routed slots); BLOCK_K = 128, so each K step applies one activation scale per row and one
  weight scale per 128 output columns to an fp8 tl.dot. Triton has no e4m3 type below sm_89,
  so fp8 experts need Ada/Hopper or newer (a clear error otherwise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenspeed_kernels.triton.moe_align import MoeAlignment, moe_align
from tokenspeed_kernels.triton.moe_configs import MoeGemmConfig, moe_gemm_config
from tokenspeed_kernels.triton.rounding import interpreting as _interpreting
from tokenspeed_kernels.triton.rounding import round_to_bf16_grid

FP8_GROUP = 128
E4M3_MAX = 448.0
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}



@triton.jit
def _round_to_e4m3_grid(v):
    """Round fp32 to the nearest e4m3 value (ties to even) in fp32 arithmetic. Only for the
    interpreter, whose fp32 -> fp8 cast drops the carry into the exponent (127.3 -> 64)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)  # keep 3 mantissa bits
    sub = (v * 512.0 + 12582912.0) - 12582912.0  # subnormals: multiples of 2^-9 (1.5 * 2^23 forces integer rounding)
    return tl.where(tl.abs(v) < 0.015625, sub / 512.0, normal)


@triton.jit
def _quant_fp8_kernel(
    x_ptr, q_ptr, s_ptr, rows_ptr, n_rows, K, stride_x,
    INDIRECT: tl.constexpr, GROUP: tl.constexpr, EXACT_CAST: tl.constexpr,
):  # fmt: skip
    """One (row, 128-group): scale = max(amax, 1e-10) / 448, q = e4m3(clamp(x / scale)), IEEE division."""
    pid = tl.program_id(0)
    row = tl.load(rows_ptr + pid) if INDIRECT else pid
    if row >= n_rows:
        return  # a padding row of the sorted slots
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs).to(tl.float32)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-10), 448.0)
    q = tl.clamp(tl.div_rn(x, scale), -448.0, 448.0)
    if EXACT_CAST:
        q = _round_to_e4m3_grid(q)
    tl.store(q_ptr + row.to(tl.int64) * K + offs, q.to(tl.float8e4nv))
    tl.store(s_ptr + row.to(tl.int64) * (K // GROUP) + g, scale)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, slots_ptr, tile_expert_ptr, route_w_ptr,
    N, K, num_slots, a_row_div, num_tiles,
    stride_am, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_om,
    SWIGLU: tl.constexpr, MUL_ROUTE: tl.constexpr, FP8: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    e = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return  # past the used tiles

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(slots_ptr + offs_m)
    row_ok = slot < num_slots
    a_row = (slot // a_row_div).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
    b_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    s_ptrs = w_scale_ptr + e * stride_se + (offs_n // 128) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kk * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if SWIGLU:  # the up rows sit N rows below the gate rows
            b_up = tl.load(b_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:  # interpreter: its tl.dot mishandles 16-bit / fp8 operands; fp32 is exact here
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            if SWIGLU:
                b_up = b_up.to(tl.float32)
        if FP8:
            a_s = tl.load(a_scale_ptr + a_row * (K // 128) + kk, mask=row_ok, other=0.0)
            b_s = tl.load(s_ptrs + kk * stride_sk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            if SWIGLU:
                b_s_up = tl.load(s_ptrs + (N // 128) * stride_sn + kk * stride_sk, mask=n_ok, other=0.0)
                acc_up += tl.dot(a, b_up) * a_s[:, None] * b_s_up[None, :]
        else:
            acc = tl.dot(a, b, acc)
            if SWIGLU:
                acc_up = tl.dot(a, b_up, acc_up)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk

    if SWIGLU:
        acc = tl.div_rn(acc, 1.0 + tl.exp(-acc)) * acc_up
    if MUL_ROUTE:
        acc = acc * tl.load(route_w_ptr + slot, mask=row_ok, other=0.0)[:, None]
    if DOT_F32 and out_ptr.dtype.element_ty == tl.bfloat16:  # interpreter only (see round_to_bf16_grid)
        acc = round_to_bf16_grid(acc)
    out_ptrs = out_ptr + slot[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(
    slot_out_ptr, ids_ptr, out_ptr, H, expert_offset, num_experts,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, EXACT_CAST: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # slot order, as the reference accumulates
        e = tl.load(ids_ptr + t * TOP_K + j) - expert_offset
        local = (e >= 0) & (e < num_experts)
        acc += tl.load(slot_out_ptr + (t * TOP_K + j) * H + offs, mask=h_ok & local, other=0.0)
    if EXACT_CAST and out_ptr.dtype.element_ty == tl.bfloat16:
        acc = round_to_bf16_grid(acc)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def quant_fp8_per_token_group(x: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values [R, K] and fp32 scales [R, K / 128]; with ``rows`` only those rows (ids >= R skipped)."""
    R, K = x.shape
    q = torch.empty(R, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(R, K // FP8_GROUP, dtype=torch.float32, device=x.device)
    grid = (rows.numel() if rows is not None else R, K // FP8_GROUP)
    if grid[0]:
        ids = rows if rows is not None else s  # unused pointer when not INDIRECT
        _quant_fp8_kernel[grid](x, q, s, ids, R, K, x.stride(0), INDIRECT=rows is not None, GROUP=FP8_GROUP,
                                EXACT_CAST=_interpreting())  # fmt: skip
    return q, s


def moe_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor | None,
    out: torch.Tensor,
    align: MoeAlignment,
    config: MoeGemmConfig,
    *,
    a_row_div: int,
    swiglu: bool,
    route_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One grouped GEMM: ``out[slot] = epilogue(a[slot // a_row_div] @ w[expert].T)`` over aligned tiles.

    With ``swiglu`` w is ``[E, 2N, K]`` and out gets ``silu(gate) * up`` ``[*, N]``; with
    ``route_weights`` (fp32, per slot) the product is scaled by the slot's routing weight."""
    fp8 = w.dtype == torch.float8_e4m3fn
    n = w.shape[1] // 2 if swiglu else w.shape[1]
    K = w.shape[2]
    assert config.block_m == align.block_m, "the GEMM tile must match the alignment's padding"
    if fp8:
        assert config.block_k == FP8_GROUP and a_scale is not None and w_scale is not None
    grid = (align.num_tiles * triton.cdiv(n, config.block_n),)
    ws = w_scale if fp8 else w
    _moe_gemm_kernel[grid](
        a, a_scale if fp8 else a, w, ws, out, align.sorted_slots, align.tile_expert,
        route_weights if route_weights is not None else out,
        n, K, align.num_slots, a_row_div, align.num_tiles,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2),
        ws.stride(0) if fp8 else 0, ws.stride(1) if fp8 else 0, ws.stride(2) if fp8 else 0, out.stride(0),
        SWIGLU=swiglu, MUL_ROUTE=route_weights is not None, FP8=fp8, DOT_F32=_interpreting(),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def _check(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale) -> None:
    if hidden.dtype not in _TL:
        raise ValueError(f"fused_moe (triton): hidden_states must be bf16/fp16, got {hidden.dtype}")
    if not all(t.is_cuda or _interpreting() for t in (hidden, w13, w2, topk_weights, topk_ids)):
        raise ValueError("fused_moe (triton): all tensors must be on a CUDA device")
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("fused_moe (triton): hidden [T, H], w13 [E, 2I, H], w2 [E, H, I] expected")
    E, two_i, H = w13.shape
    if hidden.shape[1] != H or two_i % 2 or w2.shape != (E, H, two_i // 2):
        raise ValueError(f"fused_moe (triton): shapes disagree: hidden {tuple(hidden.shape)}, w13 "
                         f"{tuple(w13.shape)}, w2 {tuple(w2.shape)}")  # fmt: skip
    if topk_ids.dtype != torch.int32 or topk_weights.dtype != torch.float32 or topk_ids.shape != topk_weights.shape:
        raise ValueError("fused_moe (triton): topk_ids int32 and topk_weights float32 of one shape [T, top_k]")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_moe (triton): topk_ids must be [{hidden.shape[0]}, top_k], got {tuple(topk_ids.shape)}")
    if w13.dtype == torch.float8_e4m3fn:
        if hidden.is_cuda and torch.cuda.get_device_capability(hidden.device) < (8, 9):
            raise ValueError("fused_moe (triton): fp8 e4m3 experts need compute capability >= 8.9 (Triton has no e4m3 below)")
        if w2.dtype != w13.dtype or w13_scale is None or w2_scale is None:
            raise ValueError("fused_moe (triton): fp8 w13 and w2 need w13_scale and w2_scale")
        if H % FP8_GROUP or (two_i // 2) % FP8_GROUP:
            raise ValueError(f"fused_moe (triton): fp8 needs hidden and intermediate % 128 == 0, got {H}, {two_i // 2}")
        for s, w in ((w13_scale, w13), (w2_scale, w2)):
            want = (E, -(-w.shape[1] // FP8_GROUP), -(-w.shape[2] // FP8_GROUP))
            if s.dtype != torch.float32 or tuple(s.shape) != want:
                raise ValueError(f"fused_moe (triton): scales must be float32 {want}, got {s.dtype} {tuple(s.shape)}")
    elif w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"fused_moe (triton): weights must be {hidden.dtype} or float8_e4m3fn, got {w13.dtype}, {w2.dtype}")


def fused_moe_with_config(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    expert_offset: int = 0,
    configs: tuple[MoeGemmConfig, MoeGemmConfig] | None = None,
) -> torch.Tensor:
    """fused_moe with explicit (gate/up, down) configs (tests, tuning); None = the heuristic."""
    _check(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    T, H = hidden_states.shape
    E, inter = w13.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    out = torch.empty_like(hidden_states)
    if T == 0 or top_k == 0:
        return out.zero_()
    fp8 = w13.dtype == torch.float8_e4m3fn
    slots = T * top_k
    cfg1, cfg2 = configs or (
        moe_gemm_config(slots, E, inter, H, fp8, gate_up=True),
        moe_gemm_config(slots, E, H, inter, fp8, gate_up=False),
    )
    x = hidden_states if hidden_states.stride(1) == 1 else hidden_states.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    ids = topk_ids.contiguous()
    align = moe_align(ids, E, cfg1.block_m, expert_offset)
    act = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    x_s = None
    if fp8:
        x, x_s = quant_fp8_per_token_group(x)
        w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()
    moe_gemm(x, x_s, w13, w13_scale, act, align, cfg1, a_row_div=top_k, swiglu=True)
    act_s = None
    if fp8:
        act, act_s = quant_fp8_per_token_group(act, align.sorted_slots)
    slot_out = torch.empty(slots, H, dtype=torch.float32, device=x.device)
    moe_gemm(act, act_s, w2, w2_scale, slot_out, align, cfg2, a_row_div=1, swiglu=False,
             route_weights=topk_weights.contiguous())  # fmt: skip
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](slot_out, ids, out, H, expert_offset, E, TOP_K=top_k, BLOCK_H=block_h,
                                                         EXACT_CAST=_interpreting())  # fmt: skip
    return out


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    expert_offset: int = 0,
) -> torch.Tensor:
    """Triton ``tokenspeed::fused_moe`` (see tokenspeed_kernels.ops.moe.fused_moe)."""
    return fused_moe_with_config(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_offset)
