"""Torch reference of the MLA latent write: what a DeepSeek-V3 attention layer does between its
input projections and the attention kernel, written out op by op.

The kv_a projection gives each token a latent row ``[c (kv_lora_rank) | k_pe (rope dim)]``:
c is RMS-normalised (``kv_a_layernorm``), k_pe rotated, the pair stored in the paged latent cache
at the token's slot; the query's rope part q_pe is rotated with the same angles. HF numerics
(``rms_norm_ref``, ``rotary_embedding_ref``).
"""

from __future__ import annotations

import torch

from tokenspeed_kernels.reference.norm import rms_norm_ref
from tokenspeed_kernels.reference.rotary import rotary_embedding_ref


def mla_latent_write_ref(
    positions: torch.Tensor,
    latent: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    q_pe: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float,
    interleaved: bool,
    cache: torch.Tensor,
    slots: torch.Tensor,
    q_pe_out: torch.Tensor,
) -> None:
    """``cache.flatten(0, 1)[slots[t]] = [rms_norm(c[t]) | rope(k_pe[t])]``, ``q_pe_out = rope(q_pe)``."""
    rank = norm_weight.shape[0]
    c = rms_norm_ref(latent[:, :rank], norm_weight, eps)
    q_rot, k_rot = rotary_embedding_ref(positions, q_pe, latent[:, rank:].unsqueeze(1), inv_freq, attention_factor, interleaved)
    flat = cache.view(cache.shape[0] * cache.shape[1], cache.shape[2])
    flat.index_copy_(0, slots, torch.cat([c, k_rot[:, 0]], dim=-1).to(cache.dtype))
    q_pe_out.copy_(q_rot)


__all__ = ["mla_latent_write_ref"]
