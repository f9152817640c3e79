"""Rotary position embedding of q and k as one op (``torch.ops.tokenspeed.rotary_embedding``).

Python schema (a fragment of the ``tokenspeed`` library) with a CPU implementation (the torch
reference), a CUDA implementation (the Triton kernel) and a fake; no host sync, so it is
captured in the decode CUDA graphs.
"""

from __future__ import annotations

import torch

from tokenspeed_kernels.ops.norm import check_float_dtype
from tokenspeed_kernels.reference.rotary import rotary_embedding_ref

OP = "rotary_embedding"

torch.library.define(
    "tokenspeed::rotary_embedding",
    "(Tensor positions, Tensor q, Tensor k, Tensor inv_freq, float attention_factor, bool interleaved) -> (Tensor, Tensor)",
)


def check_rotary_args(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Dtype, device, rank, shape and stride checks; every message names the argument."""
    check_float_dtype(OP, "q", q)
    if k.dtype != q.dtype:
        raise ValueError(f"{OP}: k must have q's dtype {q.dtype}, got {k.dtype}")
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"{OP}: q and k must be [tokens, heads, rot_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    tokens, _, dim = q.shape
    if dim % 2 or dim == 0:
        raise ValueError(f"{OP}: rot_dim (q.shape[2] = {dim}) must be even and > 0")
    if k.shape[0] != tokens or k.shape[2] != dim:
        raise ValueError(f"{OP}: k must be [tokens={tokens}, kv_heads, rot_dim={dim}], got {tuple(k.shape)}")
    if positions.dtype not in (torch.int64, torch.int32) or positions.shape != (tokens,):
        raise ValueError(f"{OP}: positions must be int64/int32 [tokens={tokens}], got {positions.dtype} {tuple(positions.shape)}")
    if not inv_freq.is_floating_point() or inv_freq.shape != (dim // 2,):
        raise ValueError(
            f"{OP}: inv_freq must be floating [rot_dim / 2 = {dim // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}"
        )
    for name, t in (("q", q), ("k", k)):
        if t.numel() and t.stride(2) != 1:
            raise ValueError(f"{OP}: {name} must be contiguous in its last dimension, got strides {t.stride()}")
    for name, t in (("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        if t.device != q.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but q is on {q.device}")


@torch.library.impl("tokenspeed::rotary_embedding", "CPU")
def _rotary_cpu(positions, q, k, inv_freq, attention_factor, interleaved):
    check_rotary_args(positions, q, k, inv_freq)
    q_out, k_out = rotary_embedding_ref(positions, q, k, inv_freq, attention_factor, interleaved)
    return q_out.contiguous(), k_out.contiguous()


@torch.library.impl("tokenspeed::rotary_embedding", "CUDA")
def _rotary_cuda(positions, q, k, inv_freq, attention_factor, interleaved):
    check_rotary_args(positions, q, k, inv_freq)
    from tokenspeed_kernels.triton.rotary import rotary_embedding as triton_rotary

    return triton_rotary(positions, q, k, inv_freq, attention_factor, interleaved)


@torch.library.register_fake("tokenspeed::rotary_embedding")
def _rotary_fake(positions, q, k, inv_freq, attention_factor, interleaved):
    check_rotary_args(positions, q, k, inv_freq)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' positions (rotary position embedding, HF numerics).

    Args:
        positions: int64/int32 ``[tokens]``, q's device.
        q: ``[tokens, heads, rot_dim]`` bf16/fp16/fp32 (fp64 on the CPU), last dim contiguous
            (other strides free: e.g. the rope slice of a wider projection). rot_dim even.
        k: ``[tokens, kv_heads, rot_dim]``, q's dtype, same rules (MLA: kv_heads = 1).
        inv_freq: ``[rot_dim / 2]`` floating (used in fp32): the frequencies, YaRN-corrected or not.
        attention_factor: multiplies cos and sin (YaRN's mscale; 1 otherwise).
        interleaved: pairs are (x[2i], x[2i+1]) (DeepSeek) rather than (x[i], x[i + d/2]).

    Returns:
        (q_rot, k_rot), new contiguous tensors of q's and k's shapes, in the half-split layout
        ``[x1 * cos - x2 * sin | x2 * cos + x1 * sin]`` (also for interleaved inputs, as HF).
    """
    return torch.ops.tokenspeed.rotary_embedding(positions, q, k, inv_freq, attention_factor, interleaved)


__all__ = ["check_rotary_args", "rotary_embedding"]
