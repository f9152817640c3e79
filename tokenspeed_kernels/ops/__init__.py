"""Python wrappers of the public ops (``torch.ops.tokenspeed.*``) with their contracts."""

from tokenspeed_kernels.ops.kv_cache import kv_cache_gather, kv_cache_write
from tokenspeed_kernels.ops.mla import merge_attn_states, mla_decode, mla_prefill
from tokenspeed_kernels.ops.mla_latent import mla_latent_write
from tokenspeed_kernels.ops.moe import fused_moe, moe_route
from tokenspeed_kernels.ops.norm import fused_add_rms_norm, rms_norm, silu_and_mul
from tokenspeed_kernels.ops.rotary import rotary_embedding

__all__ = [
    "kv_cache_gather",
    "kv_cache_write",
    "mla_decode",
    "mla_latent_write",
    "mla_prefill",
    "merge_attn_states",
    "moe_route",
    "fused_moe",
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
]
