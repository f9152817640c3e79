"""The MLA latent write as one op (``torch.ops.tokenspeed.mla_latent_write``): kv_a RMSNorm, rope
of k_pe and q_pe, and the store of the latent row into the paged cache.

Python schema (a fragment of the ``tokenspeed`` library) with a CPU implementation (the torch
reference), a CUDA implementation (the Triton kernel) and a fake; it mutates ``cache`` and
``q_pe_out`` and returns nothing; no host sync, so it is captured in the decode CUDA graphs.
An fp8 cache is not taken here: it quantises on store through ``kv_cache_write``.
"""

from __future__ import annotations

import torch

from tokenspeed_kernels.ops.norm import check_float_dtype
from tokenspeed_kernels.reference.mla_latent import mla_latent_write_ref

OP = "mla_latent_write"

torch.library.define(
    "tokenspeed::mla_latent_write",
    "(Tensor positions, Tensor latent, Tensor norm_weight, float eps, Tensor q_pe, Tensor inv_freq, "
    "float attention_factor, bool interleaved, Tensor(a!) cache, Tensor slots, Tensor(b!) q_pe_out) -> ()",
)


def check_mla_latent_args(
    positions: torch.Tensor,
    latent: torch.Tensor,
    norm_weight: torch.Tensor,
    q_pe: torch.Tensor,
    inv_freq: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    q_pe_out: torch.Tensor,
) -> None:
    """Dtype, device, rank, shape and stride checks; every message names the argument."""
    check_float_dtype(OP, "latent", latent)
    if latent.dim() != 2 or norm_weight.dim() != 1:
        raise ValueError(f"{OP}: latent must be [tokens, rank + rope] and norm_weight [rank], got "
                         f"{tuple(latent.shape)} and {tuple(norm_weight.shape)}")  # fmt: skip
    tokens, width = latent.shape
    rank = norm_weight.shape[0]
    rope = width - rank
    if rank < 1 or rope < 2 or rope % 2:
        raise ValueError(f"{OP}: latent's last dim ({width}) must be norm_weight's rank ({rank}) + an even rope dim >= 2")
    if q_pe.dim() != 3 or q_pe.shape[0] != tokens or q_pe.shape[2] != rope:
        raise ValueError(f"{OP}: q_pe must be [tokens={tokens}, heads, rope={rope}], got {tuple(q_pe.shape)}")
    if q_pe_out.shape != q_pe.shape:
        raise ValueError(f"{OP}: q_pe_out must have q_pe's shape {tuple(q_pe.shape)}, got {tuple(q_pe_out.shape)}")
    for name, t in (("norm_weight", norm_weight), ("q_pe", q_pe), ("q_pe_out", q_pe_out)):
        if t.dtype != latent.dtype:
            raise ValueError(f"{OP}: {name} must have latent's dtype {latent.dtype}, got {t.dtype}")
    if cache.dtype != latent.dtype:
        raise ValueError(f"{OP}: cache must have latent's dtype {latent.dtype}, got {cache.dtype} "
                         "(an fp8 cache quantises on store: kv_cache_write)")  # fmt: skip
    if cache.dim() != 3 or cache.shape[2] != width:
        raise ValueError(f"{OP}: cache must be [pages, page_size, rank + rope = {width}], got {tuple(cache.shape)}")
    if not cache.is_contiguous():
        raise ValueError(f"{OP}: cache must be contiguous, got strides {cache.stride()}")
    if positions.dtype not in (torch.int64, torch.int32) or positions.shape != (tokens,):
        raise ValueError(f"{OP}: positions must be int64/int32 [tokens={tokens}], got {positions.dtype} {tuple(positions.shape)}")
    if slots.dtype != torch.int64 or slots.shape != (tokens,):
        raise ValueError(f"{OP}: slots must be int64 [tokens={tokens}], got {slots.dtype} {tuple(slots.shape)}")
    if not inv_freq.is_floating_point() or inv_freq.shape != (rope // 2,):
        got = f"{inv_freq.dtype} {tuple(inv_freq.shape)}"
        raise ValueError(f"{OP}: inv_freq must be floating [rope / 2 = {rope // 2}], got {got}")
    for name, t in (("latent", latent), ("q_pe", q_pe), ("q_pe_out", q_pe_out), ("norm_weight", norm_weight)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{OP}: {name} must be contiguous in its last dimension, got strides {t.stride()}")
    for name, t in (("norm_weight", norm_weight), ("q_pe", q_pe), ("q_pe_out", q_pe_out), ("cache", cache),
                    ("positions", positions), ("slots", slots), ("inv_freq", inv_freq)):  # fmt: skip
        if t.device != latent.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but latent is on {latent.device}")


@torch.library.impl("tokenspeed::mla_latent_write", "CPU")
def _mla_latent_cpu(positions, latent, norm_weight, eps, q_pe, inv_freq, attention_factor, interleaved, cache, slots, q_pe_out):
    check_mla_latent_args(positions, latent, norm_weight, q_pe, inv_freq, cache, slots, q_pe_out)
    mla_latent_write_ref(
        positions, latent, norm_weight, eps, q_pe, inv_freq, attention_factor, interleaved, cache, slots, q_pe_out
    )


@torch.library.impl("tokenspeed::mla_latent_write", "CUDA")
def _mla_latent_cuda(positions, latent, norm_weight, eps, q_pe, inv_freq, attention_factor, interleaved, cache, slots, q_pe_out):
    check_mla_latent_args(positions, latent, norm_weight, q_pe, inv_freq, cache, slots, q_pe_out)
    from tokenspeed_kernels.triton.mla_latent import mla_latent_write as triton_write

    triton_write(positions, latent, norm_weight, eps, q_pe, inv_freq, attention_factor, interleaved, cache, slots, q_pe_out)


@torch.library.register_fake("tokenspeed::mla_latent_write")
def _mla_latent_fake(positions, latent, norm_weight, eps, q_pe, inv_freq, attention_factor, interleaved, cache, slots, q_pe_out):
    check_mla_latent_args(positions, latent, norm_weight, q_pe, inv_freq, cache, slots, q_pe_out)


def mla_latent_write(
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
    """Store each token's latent row in the paged cache and rotate its query's rope part.

    Args:
        positions: int64/int32 ``[tokens]``: the rope positions.
        latent: ``[tokens, rank + rope]`` bf16/fp16/fp32 (fp64 on the CPU), last dim contiguous
            (e.g. the kv_a columns of a fused projection): ``[c | k_pe]``.
        norm_weight: ``[rank]``, latent's dtype: kv_a_layernorm's weight; ``eps`` its epsilon.
        q_pe: ``[tokens, heads, rope]``, latent's dtype, last dim contiguous.
        inv_freq: ``[rope / 2]`` floating; ``attention_factor``, ``interleaved``: as
            ``tokenspeed_kernels.ops.rotary_embedding``.
        cache: ``[pages, page_size, rank + rope]`` contiguous, latent's dtype; row
            ``slots[t]`` of ``cache.flatten(0, 1)`` receives ``[rms_norm(c) | rope(k_pe)]``.
        slots: int64 ``[tokens]`` (page * page_size + offset), distinct, in range (not checked
            on CUDA: that would need a host sync).
        q_pe_out: ``[tokens, heads, rope]``, latent's dtype, last dim contiguous (e.g. the rope
            columns of the absorbed decode query), distinct from q_pe: receives rope(q_pe).

    Numerics: those of ``rms_norm`` and ``rotary_embedding`` (HF's rounding steps).
    """
    torch.ops.tokenspeed.mla_latent_write(
        positions, latent, norm_weight, eps, q_pe, inv_freq, attention_factor, interleaved, cache, slots, q_pe_out
    )


__all__ = ["check_mla_latent_args", "mla_latent_write"]
