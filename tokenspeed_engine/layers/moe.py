"""Routed MoE experts for ``fused_moe``: split over expert-parallel and tensor-parallel ranks.

``w13 [local_experts, 2 * I_local, hidden]`` (gate rows, then up rows) and
``w2 [local_experts, hidden, I_local]``. Expert parallelism gives rank ``ep_rank`` the
contiguous experts ``[ep_rank * E / ep, (ep_rank + 1) * E / ep)``; tensor parallelism splits
each expert's intermediate dimension. Either way the result is a partial sum over the MoE
group. With ``fp8=True`` the weights stay e4m3 with 128x128 block scales (``w13_scale``,
``w2_scale``), as DeepSeek's fp8 checkpoints ship them.

Shard ids of the per-expert checkpoint tensors: ``(expert, "gate" | "up" | "down")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenspeed_engine.layers.kernels import kernel
from tokenspeed_engine.loader.source import TensorSource, check_shape

BLOCK = 128


class FusedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        ep_rank: int = 0,
        ep_size: int = 1,
        fp8: bool = False,
        dtype: Any = None,
        device: Any = None,
    ):
        super().__init__()
        if num_experts % ep_size or intermediate % tp_size:
            raise ValueError(
                f"{num_experts} experts / intermediate {intermediate} do not split over ep={ep_size}, tp={tp_size}"
            )
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.local_experts = num_experts // ep_size
        self.expert_offset = ep_rank * self.local_experts
        self.inter_local = intermediate // tp_size
        self.tp_rank = tp_rank
        self.fp8 = fp8
        if fp8 and (hidden % BLOCK or self.inter_local % BLOCK):
            raise ValueError(
                f"fp8 experts need hidden ({hidden}) and per-rank intermediate ({self.inter_local}) "
                f"to be multiples of {BLOCK}"
            )
        wdtype = torch.float8_e4m3fn if fp8 else dtype
        E, inter, K = self.local_experts, self.inter_local, hidden
        self.w13 = nn.Parameter(torch.empty(E, 2 * inter, K, dtype=wdtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, K, inter, dtype=wdtype, device=device), requires_grad=False)
        local = range(self.expert_offset, self.expert_offset + E)
        params = [(self.w13, ("gate", "up")), (self.w2, ("down",))]
        if fp8:
            self.w13_scale = nn.Parameter(
                torch.empty(E, 2 * inter // BLOCK, K // BLOCK, device=device), requires_grad=False
            )
            self.w2_scale = nn.Parameter(torch.empty(E, K // BLOCK, inter // BLOCK, device=device), requires_grad=False)
            params += [(self.w13_scale, ("gate", "up")), (self.w2_scale, ("down",))]
        else:
            self.w13_scale = self.w2_scale = None
        for p, kinds in params:
            p.weight_loader = self.load_expert
            p.expected_shards = tuple((e, k) for e in local for k in kinds)

    def load_expert(self, param: nn.Parameter, src: TensorSource, shard_id: tuple[int, str]) -> None:
        expert, kind = shard_id
        if param.dtype == torch.float8_e4m3fn and src.dtype != torch.float8_e4m3fn:
            raise TypeError(f"{src.name}: fp8 experts need fp8 checkpoint weights, got {src.dtype}")
        e = expert - self.expert_offset
        if not 0 <= e < self.local_experts:
            return  # another expert-parallel rank's expert
        scale = param.dtype == torch.float32 and self.fp8
        div = BLOCK if scale else 1
        inter, K = self.inter_local // div, -(-self.hidden // div)
        full_i = -(-self.intermediate // div)
        if kind == "down":
            check_shape(src, (K, full_i), f"expert {expert} down_proj" + (" scale" if scale else ""))
            param.data[e].copy_(src.narrow(1, self.tp_rank * inter, inter).load().to(param.dtype))
            return
        check_shape(src, (full_i, K), f"expert {expert} {kind}_proj" + (" scale" if scale else ""))
        rows = param.data[e].narrow(0, 0 if kind == "gate" else inter, inter)
        rows.copy_(src.narrow(0, self.tp_rank * inter, inter).load().to(param.dtype))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return kernel("fused_moe", x)(
            x, self.w13, self.w2, topk_weights, topk_ids, self.w13_scale, self.w2_scale, self.expert_offset
        )
