"""Triton moe_route: DeepSeek-V3 grouped sigmoid routing and softmax top-k, one kernel.

Contract: ``tokenspeed_kernels.ops.moe.moe_route``. One program owns BLOCK_T tokens and the
whole expert row (padded to a power of two), so scoring, group selection, top-k and
renormalisation never leave registers. The ids must equal the reference's exactly, so:

* top-k is k rounds of "max, then the lowest column holding it" over the columns not yet
  taken; this is what a stable descending sort returns, including among -inf (masked
  groups) when top_k exceeds the experts left in the kept groups;
* a group's score is its best plus its second best (the first occurrence of the best is
  removed before the second max, so a duplicated best counts twice, as topk(2) does);
* divisions use ``div_rn`` (IEEE) rather than Triton's approximate fp32 division.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _take_max(vals, taken, cols, BIG: tl.constexpr):
    """(max over the untaken columns, lowest untaken column holding it) per row."""
    avail = tl.where(taken, float("-inf"), vals)
    best = tl.max(avail, axis=1)
    hit = (avail == best[:, None]) & ~taken
    idx = tl.min(tl.where(hit, cols[None, :], BIG), axis=1)
    return best, idx


@triton.jit
def _moe_route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    T, E, stride_lt, scaling,
    TOP_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if SOFTMAX:
        x = tl.where(col_ok[None, :], x, float("-inf"))
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        scores = tl.div_rn(p, tl.sum(p, axis=1)[:, None])
    else:
        scores = tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Padding columns: never chosen, never part of a group's best two.
    pad = tl.broadcast_to((cols >= E)[None, :], [BLOCK_T, BLOCK_E])
    choice = tl.where(pad, float("-inf"), choice)

    if N_GROUP > 1:
        per_group = E // N_GROUP
        gcols = tl.arange(0, BLOCK_G)
        group_of = cols // per_group
        gscore = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            out_g = tl.broadcast_to(((group_of != g) | (cols >= E))[None, :], [BLOCK_T, BLOCK_E])
            best, idx = _take_max(choice, out_g, cols, BLOCK_E)
            s = best
            if HAS_BIAS:
                if per_group > 1:
                    second, _ = _take_max(choice, out_g | (cols[None, :] == idx[:, None]), cols, BLOCK_E)
                    s = best + second
            gscore = tl.where(gcols[None, :] == g, s[:, None], gscore)
        gtaken = tl.broadcast_to((gcols >= N_GROUP)[None, :], [BLOCK_T, BLOCK_G])
        for _ in tl.static_range(TOPK_GROUP):
            _, gi = _take_max(gscore, gtaken, gcols, BLOCK_G)
            gtaken = gtaken | (gcols[None, :] == gi[:, None])
        kept = gtaken & (gcols < N_GROUP)[None, :]
        keep = pad & ~pad  # all False
        for g in tl.static_range(N_GROUP):
            kept_g = tl.sum(tl.where(kept & (gcols[None, :] == g), 1, 0), axis=1) > 0
            keep = keep | (kept_g[:, None] & (group_of == g)[None, :])
        choice = tl.where(keep, choice, float("-inf"))

    kcols = tl.arange(0, BLOCK_K)
    taken = pad
    ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    total = tl.zeros([BLOCK_T], tl.float32)
    for j in tl.static_range(TOP_K):
        _, idx = _take_max(choice, taken, cols, BLOCK_E)
        hit = cols[None, :] == idx[:, None]
        taken = taken | hit
        wj = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        total += wj  # in pick order, as the reference's sum over its top_k slots
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        w = tl.where(kcols[None, :] == j, wj[:, None], w)
    if RENORM:
        w = tl.div_rn(w, (total + 1e-20)[:, None])
    w = w * scaling
    out_mask = row_ok[:, None] & (kcols < TOP_K)[None, :]
    offs = rows[:, None] * TOP_K + kcols[None, :]
    tl.store(ids_ptr + offs, ids, mask=out_mask)
    tl.store(weights_ptr + offs, w, mask=out_mask)


def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    scoring_func: str = "sigmoid",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``tokenspeed::moe_route`` (see tokenspeed_kernels.ops.moe.moe_route)."""
    if router_logits.dim() != 2:
        raise ValueError(f"moe_route: router_logits must be [tokens, experts], got {tuple(router_logits.shape)}")
    if scoring_func not in ("sigmoid", "softmax"):
        raise ValueError(f"moe_route: scoring_func must be 'sigmoid' or 'softmax', got {scoring_func!r}")
    tokens, experts = router_logits.shape
    if not 1 <= top_k <= experts:
        raise ValueError(f"moe_route: top_k={top_k} must be in [1, {experts}]")
    if n_group < 1 or experts % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"moe_route: n_group={n_group} must divide {experts} and 1 <= topk_group={topk_group} <= n_group")
    if correction_bias is not None and correction_bias.shape != (experts,):
        raise ValueError(f"moe_route: correction_bias must be [{experts}], got {tuple(correction_bias.shape)}")
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=logits.device)
    if tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(experts)
    # Registers: a program keeps several [BLOCK_T, BLOCK_E] tiles live; at most 16 elements of
    # each per thread (<= 8 from 512 experts on, where the group/top-k masks add more) keeps
    # ptxas free of spills (checked offline: tests/kernels/test_triton_offline_compile.py;
    # 256 experts x 16 tokens on 4 warps spilled 120 B, 384 x 8 on 8 warps 8 B).
    num_warps = 4 if block_e < 256 else 8
    per_thread = 16 if block_e <= 256 else 8
    block_t = max(1, min(16, per_thread * 32 * num_warps // block_e, triton.next_power_of_2(tokens)))
    bias = correction_bias.contiguous() if correction_bias is not None else logits
    _moe_route_kernel[(triton.cdiv(tokens, block_t),)](
        logits, bias, weights, ids, tokens, experts, logits.stride(0), float(routed_scaling_factor),
        TOP_K=top_k, SOFTMAX=scoring_func == "softmax", HAS_BIAS=correction_bias is not None,
        N_GROUP=n_group, TOPK_GROUP=topk_group, RENORM=bool(renormalize),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=num_warps,
    )  # fmt: skip
    return weights, ids
