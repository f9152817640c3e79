"""Registration of the in-tree kernels with the registry.

Each family's backends register here with what they need and support; the
implementations import lazily (``"module:attr"``), so a broken backend fails
loudly when selected, not at ``import tokenspeed_kernels``.
"""

from __future__ import annotations

import torch

from tokenspeed_kernels import registry
from tokenspeed_kernels.backends.moe_sm90 import register_moe_sm90_kernels
from tokenspeed_kernels.registry import CPU_ONLY, Capability, Priority
from tokenspeed_kernels.triton import register_triton_kernels

FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
GPU_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
NVIDIA = Capability(frozenset({"nvidia"}), min_cc=(7, 0))
HOPPER = Capability(frozenset({"nvidia"}), min_cc=(9, 0), max_cc=(9, 0))

OPS = ("mla_decode", "mla_prefill", "merge_attn_states", "moe_route", "fused_moe")
_OP_MODULE = {
    "mla_decode": "mla",
    "mla_prefill": "mla",
    "merge_attn_states": "mla",
    "moe_route": "moe",
    "fused_moe": "moe",
}


def register_builtin_kernels(built_with_cuda: bool) -> None:
    """Register every in-tree kernel; CUDA ones are marked unavailable in a CPU-only build."""
    no_cuda = None if built_with_cuda else "this build of tokenspeed_kernels._C has no CUDA kernels"
    for op in OPS:
        module = _OP_MODULE[op]
        registry.register(
            op,
            "reference",
            f"tokenspeed_kernels.reference.{module}:{op}_ref",
            priority=Priority.REFERENCE,
            description="torch reference (any device; the tests' oracle)",
        )
        registry.register(
            op,
            "native_cpu",
            f"tokenspeed_kernels.ops.{module}:{op}",
            capability=CPU_ONLY,
            dtypes=FLOATS,
            priority=Priority.PORTABLE,
            description="C++ ATen implementation (torch.ops.tokenspeed CPU key)",
        )
    registry.register(
        "merge_attn_states",
        "cuda",
        "tokenspeed_kernels.ops.mla:merge_attn_states",
        capability=NVIDIA,
        dtypes=GPU_FLOATS,
        priority=Priority.PERFORMANT,
        description="vectorised CUDA kernel (torch.ops.tokenspeed CUDA key)",
        unavailable=no_cuda,
    )
    registry.register(
        "mla_decode",
        "cuda_sm90",
        "tokenspeed_kernels.ops.mla:mla_decode",
        capability=HOPPER,
        dtypes=(torch.bfloat16,),
        traits={
            "page_size": {16, 32, 64, 128, 256},
            "heads": {16, 32, 64, 128},
            "q_len": range(1, 9),
            "head_dim": {576},
            "kv_dtype": {torch.bfloat16, torch.float8_e4m3fn},  # fp8: per-tensor kv_scale, f16 wgmma
        },
        priority=Priority.SPECIALISED,
        description="TMA + wgmma warp-specialised decode, split-KV planned on the device (CUDA key)",
        unavailable=no_cuda,
    )
    registry.register(
        "mla_prefill",
        "cuda_sm90",
        "tokenspeed_kernels.ops.mla:mla_prefill",
        capability=HOPPER,
        dtypes=(torch.bfloat16,),
        traits={"head_dim_qk": {192}, "head_dim_v": {128}},  # any heads (multiple of kv_heads), any lengths
        priority=Priority.SPECIALISED,  # tests/kernels/test_mla_prefill_sm90.py: 23/23 on the H100 (2026-11-23)
        description="FA3-style ragged prefill: TMA producer, ping-pong wgmma consumers, persistent L2-aware tiles (CUDA key)",
        unavailable=no_cuda,
    )
    register_moe_sm90_kernels(no_cuda)
    registry.register(
        "kv_cache_write",
        "reference",
        "tokenspeed_kernels.ops.kv_cache:kv_cache_write",  # the torch op: torch reference on CPU, Triton on CUDA
        priority=Priority.REFERENCE,
        description="torch.ops.tokenspeed.kv_cache_write (CPU: torch reference; CUDA: the Triton kernel)",
    )
    for op, module in (("rms_norm", "norm"), ("fused_add_rms_norm", "norm"), ("silu_and_mul", "norm"),
                       ("rotary_embedding", "rotary"), ("mla_latent_write", "mla_latent")):  # fmt: skip
        registry.register(
            op,
            "reference",
            f"tokenspeed_kernels.reference.{module}:{op}_ref",
            priority=Priority.REFERENCE,
            description="torch composite with HF numerics (any device; the CPU op and the tests' oracle)",
        )
    register_triton_kernels()  # imports Triton lazily, on first use
