"""Device-agnostic torch references of every op: readable, vectorised per sequence.

They are the oracles of the kernel tests (run them on float64 inputs) and the
`reference` backend of the registry (any device). They share no code with the
C++ CPU implementations, so the two check each other. (The KV write has no C++ version: its
CPU op is this reference, and the tests check it against a brute-force nearest-e4m3 oracle.)
"""

from tokenspeed_kernels.reference.kv_cache import (
    dequantize_e4m3,
    kv_cache_gather_ref,
    kv_cache_write_ref,
    quantize_e4m3,
)
from tokenspeed_kernels.reference.mla import merge_attn_states_ref, mla_decode_ref, mla_prefill_ref
from tokenspeed_kernels.reference.mla_latent import mla_latent_write_ref
from tokenspeed_kernels.reference.moe import fused_moe_by_expert_ref, fused_moe_ref, moe_route_ref
from tokenspeed_kernels.reference.norm import fused_add_rms_norm_ref, rms_norm_ref, silu_and_mul_ref
from tokenspeed_kernels.reference.rotary import rotary_embedding_ref

__all__ = [
    "dequantize_e4m3",
    "kv_cache_gather_ref",
    "kv_cache_write_ref",
    "quantize_e4m3",
    "mla_decode_ref",
    "mla_prefill_ref",
    "merge_attn_states_ref",
    "moe_route_ref",
    "fused_moe_by_expert_ref",
    "fused_moe_ref",
    "rms_norm_ref",
    "fused_add_rms_norm_ref",
    "silu_and_mul_ref",
    "rotary_embedding_ref",
    "mla_latent_write_ref",
]
