"""MoE ops: expert routing and the fused expert pipeline."""

from __future__ import annotations

import torch


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
    """Choose top_k experts per token.

    DeepSeek-V3 (``scoring_func="sigmoid"``): scores = sigmoid(logits); the choice uses
    scores + correction_bias (``e_score_correction_bias``), the weights the unbiased scores.
    With n_group > 1 the experts are split into n_group equal groups; a group scores the sum
    of its two best biased scores (its best score when correction_bias is None); only the
    topk_group best groups compete. ``scoring_func="softmax"`` is plain softmax top-k.
    Equal scores are broken toward the lower index. Selected weights are divided by their sum
    when ``renormalize`` (plus 1e-20) and multiplied by ``routed_scaling_factor``.

    Args:
        router_logits: ``[tokens, num_experts]`` bf16/fp16/fp32/fp64 (computed in fp32).
        correction_bias: ``[num_experts]`` or None.

    Returns:
        ``topk_weights`` float32 ``[tokens, top_k]`` and ``topk_ids`` int32 ``[tokens, top_k]``,
        best expert first.
    """
    return torch.ops.tokenspeed.moe_route(
        router_logits,
        int(top_k),
        scoring_func,
        correction_bias,
        int(n_group),
        int(topk_group),
        renormalize,
        float(routed_scaling_factor),
    )


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
    """Apply routed SwiGLU experts and combine them back in token order.

    ``out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(gate) * up)``, with
    ``gate, up = (w13[e] @ hidden_states[t]).split(intermediate)`` and
    ``e = topk_ids[t, j] - expert_offset``; slots whose e falls outside
    ``[0, local_experts)`` belong to another expert-parallel rank and add nothing.
    The SiLU-and-mul intermediate is stored in the activation dtype.

    Args:
        hidden_states: ``[tokens, hidden]`` bf16/fp16/fp32/fp64.
        w13: ``[local_experts, 2 * intermediate, hidden]`` gate rows then up rows; the
            activation dtype, or float8_e4m3fn (DeepSeek fp8 checkpoints).
        w2: ``[local_experts, hidden, intermediate]``, same dtype as w13.
        topk_weights: float32 ``[tokens, top_k]`` (from :func:`moe_route`).
        topk_ids: int32 ``[tokens, top_k]`` global expert ids.
        w13_scale, w2_scale: float32 ``[local_experts, ceil(rows/128), ceil(cols/128)]``
            (``weight_scale_inv``: weight = fp8 value * scale) for fp8 weights; activations are
            then quantised per token in groups of 128 (hidden and intermediate % 128 == 0).
        expert_offset: global id of local expert 0 (expert parallelism).

    Returns:
        ``[tokens, hidden]`` in hidden_states' dtype.
    """
    return torch.ops.tokenspeed.fused_moe(
        hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, int(expert_offset)
    )
