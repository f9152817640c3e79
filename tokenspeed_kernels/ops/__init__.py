"""Python wrappers of the public ops (``torch.ops.tokenspeed.*``) with their contracts."""

from tokenspeed_kernels.ops.kv_cache import kv_cache_gather, kv_cache_write
from tokenspeed_kernels.ops.mla import merge_attn_states, mla_decode, mla_prefill
from tokenspeed_kernels.ops.moe import fused_moe, moe_route

__all__ = [
    "kv_cache_gather",
    "kv_cache_write",
    "mla_decode",
    "mla_prefill",
    "merge_attn_states",
    "moe_route",
    "fused_moe",
]
