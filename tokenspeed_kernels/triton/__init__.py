"""Portable Triton backends. Importing this package does not import Triton: the kernels
load lazily through the registry ("module:attr"), so a missing or broken Triton shows up
with its own error when the backend is selected, not at ``import tokenspeed_kernels``."""

from __future__ import annotations

import torch

from tokenspeed_kernels import registry
from tokenspeed_kernels.registry import Capability, Priority

# Triton's tl.dot on bf16 needs mma (sm_80+); Hopper runs the same code.
NVIDIA_AMPERE_PLUS = Capability(frozenset({"nvidia"}), min_cc=(8, 0))


def register_triton_kernels() -> None:
    """Register every Triton kernel with the registry (idempotent: re-registering replaces)."""
    registry.register(
        "mla_decode",
        "triton",
        "tokenspeed_kernels.triton.mla_decode:mla_decode",
        capability=NVIDIA_AMPERE_PLUS,
        dtypes=(torch.bfloat16, torch.float16),
        traits={
            "page_size": {16, 32, 64, 128},
            "q_len": range(1, 9),
            "head_dim": {576},
            # the cache's dtype: q's, or e4m3 with a per-tensor scale (mla_decode_fp8.py)
            "kv_dtype": {torch.bfloat16, torch.float16, torch.float8_e4m3fn},
        },
        priority=Priority.PORTABLE,
        description="Triton split-KV paged MLA decode (device-side splits, LSE combine; bf16/fp16 or fp8 cache)",
    )
    registry.register(
        "kv_cache_write",
        "triton",
        "tokenspeed_kernels.triton.kv_cache_write:kv_cache_write",
        capability=Capability(frozenset({"nvidia"}), min_cc=(8, 9)),  # hardware e4m3 conversion (sm_89+)
        dtypes=(torch.bfloat16, torch.float16, torch.float32),  # the values' dtype
        priority=Priority.PORTABLE,
        description="Triton paged KV write, quantising to e4m3 on store (per-tensor scale)",
    )
    registry.register(
        "mla_prefill",
        "triton",
        "tokenspeed_kernels.triton.mla_prefill:mla_prefill",
        capability=NVIDIA_AMPERE_PLUS,
        dtypes=(torch.bfloat16, torch.float16),
        traits={"head_dim_qk": {64, 128, 192}, "head_dim_v": {64, 128}},
        priority=Priority.PORTABLE,
        description="Triton FA2-style ragged prefill (GQA, causal bottom-right, heaviest q tiles first)",
    )
    registry.register(
        "moe_route",
        "triton",
        "tokenspeed_kernels.triton.moe_route:moe_route",
        capability=NVIDIA_AMPERE_PLUS,
        dtypes=(torch.bfloat16, torch.float16, torch.float32),  # the router logits' dtype
        priority=Priority.PORTABLE,
        description="Triton one-kernel routing (sigmoid + bias + groups, or softmax; exact top-k ties)",
    )
    registry.register(
        "fused_moe",
        "triton",
        "tokenspeed_kernels.triton.fused_moe:fused_moe",
        capability=NVIDIA_AMPERE_PLUS,
        dtypes=(torch.bfloat16, torch.float16),  # activations; weights in that dtype or fp8 e4m3 block-scaled
        priority=Priority.PORTABLE,
        description="Triton device-aligned grouped GEMMs (fused SwiGLU, fp8 block scales, deterministic combine)",
    )
    for op, what in (("rms_norm", "RMSNorm"), ("fused_add_rms_norm", "residual add + RMSNorm"), ("silu_and_mul", "SiLU-and-mul")):
        registry.register(
            op,
            "triton",
            f"tokenspeed_kernels.ops.norm:{op}",  # the op: validates, then its CUDA key runs the Triton kernel
            capability=NVIDIA_AMPERE_PLUS,
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            priority=Priority.PERFORMANT,  # tests/kernels/test_norm_ops.py: 13/13 GPU tests on the H100 (2026-11-23)
            description=f"Triton one-kernel {what} (HF rounding steps)",
        )
    registry.register(
        "rotary_embedding",
        "triton",
        "tokenspeed_kernels.ops.rotary:rotary_embedding",  # the op: validates, then the Triton kernel (CUDA key)
        capability=NVIDIA_AMPERE_PLUS,
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        # tests/kernels/test_rotary_op.py: 7/7 GPU tests on the H100 (2026-11-23, session 6), after
        # the first run missed the reference by fp contraction (now enable_fp_fusion=False)
        priority=Priority.PERFORMANT,
        description="Triton rotary embedding of q and k in one kernel (angles in registers, HF rounding steps)",
    )
    registry.register(
        "mla_latent_write",
        "triton",
        "tokenspeed_kernels.ops.mla_latent:mla_latent_write",  # the op: validates, then the Triton kernel (CUDA key)
        capability=NVIDIA_AMPERE_PLUS,
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        # tests/kernels/test_mla_latent_write.py: 6/6 GPU tests on the H100 (2026-11-23, session 8),
        # bitwise equal to the Triton rms_norm + rotary it replaces; engine graph / fusion tests pass with it
        priority=Priority.PERFORMANT,
        description="Triton kv_a RMSNorm + rope of k_pe / q_pe + paged latent store in one kernel",
    )
