"""Torch references of the MoE ops (see tokenspeed_kernels.ops.moe for contracts)."""

from __future__ import annotations

from collections.abc import Callable

import torch

FP8_BLOCK = 128
E4M3_MAX = 448.0


def _topk_lowest_index_on_ties(x: torch.Tensor, k: int) -> torch.Tensor:
    # Stable descending sort: among equal values the lower index comes first.
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def moe_route_ref(
    router_logits: torch.Tensor,
    top_k: int,
    scoring_func: str = "sigmoid",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``tokenspeed::moe_route`` (DeepSeek-V3 grouped routing or softmax top-k)."""
    tokens, experts = router_logits.shape
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        per_group = choice.view(tokens, n_group, experts // n_group)
        if correction_bias is not None:
            group_score = per_group.topk(min(2, experts // n_group), dim=-1).values.sum(-1)
        else:
            group_score = per_group.max(dim=-1).values
        chosen_groups = _topk_lowest_index_on_ties(group_score, topk_group)
        keep = torch.zeros(tokens, n_group, dtype=torch.bool, device=logits.device)
        keep.scatter_(1, chosen_groups, True)
        keep = keep.repeat_interleave(experts // n_group, dim=1)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = _topk_lowest_index_on_ties(choice, top_k)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def quant_dequant_fp8_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token e4m3 round trip in groups of 128 values (scale = group amax / 448)."""
    g = x.reshape(x.shape[0], -1, FP8_BLOCK)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / E4M3_MAX
    q = (g / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.to(x.dtype) * scale).reshape(x.shape)


def dequant_fp8_block_weight(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w [rows, cols] e4m3 with scale [ceil(rows/128), ceil(cols/128)] -> dtype."""
    rows, cols = w.shape
    s = scale.to(dtype).repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    return w.to(dtype) * s


def _expert_ffn(
    x: torch.Tensor,
    e: int,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    act_dtype: torch.dtype,
    perturb_gate_up: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Local expert ``e`` on rows ``x`` (already in the accumulation dtype): down(silu(gate) * up),
    with the fp8 round trips of the activations when the experts are fp8."""
    acc, fp8, inter = x.dtype, w13.dtype == torch.float8_e4m3fn, w2.shape[2]
    if fp8:
        x = quant_dequant_fp8_activation(x)
    wg = dequant_fp8_block_weight(w13[e], w13_scale[e], acc) if fp8 else w13[e].to(acc)
    gate_up = x @ wg.T
    if perturb_gate_up is not None:
        gate_up = perturb_gate_up(gate_up)
    act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    act = act.to(act_dtype).to(acc)  # the intermediate is stored in the activation dtype
    if fp8:
        act = quant_dequant_fp8_activation(act)
    wd = dequant_fp8_block_weight(w2[e], w2_scale[e], acc) if fp8 else w2[e].to(acc)
    return act @ wd.T


def fused_moe_ref(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    expert_offset: int = 0,
) -> torch.Tensor:
    """Reference of ``tokenspeed::fused_moe``, token by token and slot by slot."""
    acc = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    out = torch.zeros(hidden_states.shape, dtype=acc, device=hidden_states.device)
    for t in range(hidden_states.shape[0]):
        x = hidden_states[t : t + 1].to(acc)
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j]) - expert_offset
            if not 0 <= e < w13.shape[0]:
                continue  # another rank's expert
            y = _expert_ffn(x, e, w13, w2, w13_scale, w2_scale, hidden_states.dtype)
            out[t] += float(topk_weights[t, j]) * y[0]
    return out.to(hidden_states.dtype)


def fused_moe_by_expert_ref(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    expert_offset: int = 0,
    perturb_gate_up: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``fused_moe_ref`` expert by expert (as csrc/moe/moe_cpu.cpp): each expert's weights are
    dequantised once, so DeepSeek-V3 shapes take seconds on a GPU rather than minutes.
    fp64 / fp32 accumulation as the inputs say; works on any device.
    ``perturb_gate_up(gate_up)`` models a GEMM that accumulates differently (tolerance calibration)."""
    acc = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    out = torch.zeros(hidden_states.shape, dtype=acc, device=hidden_states.device)
    local = topk_ids.long() - expert_offset
    for e in range(w13.shape[0]):
        hit = (local == e).nonzero()
        if hit.numel() == 0:
            continue
        tok, slot = hit[:, 0], hit[:, 1]
        y = _expert_ffn(hidden_states[tok].to(acc), e, w13, w2, w13_scale, w2_scale, hidden_states.dtype, perturb_gate_up)
        out.index_add_(0, tok, y * topk_weights[tok, slot].to(acc)[:, None])
    return out.to(hidden_states.dtype)
