"""Tile choice for the Triton grouped MoE GEMMs: one heuristic, by rows per expert.

What matters is how many rows an expert's weights are multiplied with. At decode (a few
rows per expert) the GEMMs are weight streaming: the smallest M tile tl.dot allows (16)
wastes no weight bytes, and deep pipelines keep enough loads in flight.
With many rows per expert the GEMMs are compute bound: 128-row tiles halve the weight
re-reads of 64-row ones and 8 warps feed the tensor cores. fp8 needs BLOCK_K = 128 so that
one K step is exactly one 128-wide scale group of both operands.

Starting points from vLLM's fused_moe H100 tables and DeepGEMM's tile sizes; not yet tuned
on our device (see benchmarks/bench_moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoeGemmConfig:
    block_m: int  # rows (token slots) per tile; moe_align pads every expert to a multiple of it
    block_n: int  # output columns per tile (for gate/up: this many gate AND this many up columns)
    block_k: int  # reduction step; 128 with fp8 (one scale group)
    group_m: int  # M tiles walked together before the next N tile (L2 reuse of the weights)
    num_warps: int
    num_stages: int


def moe_gemm_config(num_slots: int, num_experts: int, n: int, k: int, fp8: bool, gate_up: bool) -> MoeGemmConfig:
    """Config for one grouped GEMM: ``num_slots`` routed rows over ``num_experts`` local experts,
    output width ``n`` (for gate/up: the intermediate size, each tile computing gate and up),
    reduction ``k``. Decided from shapes only, so a CUDA graph captures one config per batch size."""
    rows_per_expert = num_slots / max(1, num_experts)
    bk = 128
    if rows_per_expert <= 16:
        # Weight streaming: 16-row tiles, a deep pipeline (bf16: 4 stages of 36 KB shared memory).
        return MoeGemmConfig(16, 64 if gate_up else 128, bk, 1, 4, 5 if fp8 else 4)
    if rows_per_expert <= 64:
        return MoeGemmConfig(64 if rows_per_expert > 32 else 32, 64 if gate_up else 128, bk, 4, 4, 4)
    return MoeGemmConfig(128, 64 if gate_up else 128, bk if fp8 else 64, 8, 8, 3 if fp8 or gate_up else 4)
