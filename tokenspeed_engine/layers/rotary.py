"""Rotary position embedding: default, linear, Llama-3 and YaRN frequencies (as Hugging Face computes them).

Two layouts: ``interleaved=False`` rotates the two halves of the head (GPT-NeoX / Llama);
``interleaved=True`` rotates adjacent pairs (x0, x1), (x2, x3), ... as DeepSeek does, and
writes the result de-interleaved ([rotated evens | rotated odds]), exactly like HF's
``apply_rotary_pos_emb_interleave``; q and k get the same permutation, so q.k is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenspeed_engine.layers.kernels import kernel
from tokenspeed_kernels.reference.rotary import rotary_cos_sin


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE parameters of an HF config dict: old style (``rope_scaling`` + ``rope_theta``) or ``rope_parameters``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = config.get("rope_theta", 10000.0)
    if params["rope_type"] in ("yarn", "llama3", "longrope"):
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, p: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    base = p["rope_theta"]
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position / original
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def _llama3(dim: int, p: dict[str, Any]) -> torch.Tensor:
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def inv_freq_and_scale(dim: int, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (fp32) and the factor cos/sin are multiplied by."""
    kind = params.get("rope_type", "default")
    if kind == "yarn":
        return _yarn(dim, params, max_position)
    if kind == "llama3":
        return _llama3(dim, params), 1.0
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind != "default":
        raise NotImplementedError(f"rope type {kind!r} is not supported (default, linear, llama3, yarn are)")
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """``forward(positions [T], q [T, H, d], k [T, Hk, d]) -> (q, k)`` rotated in the last dim."""

    def __init__(
        self, dim: int, params: dict[str, Any], max_position: int, interleaved: bool = False, device: Any = None
    ):
        super().__init__()
        inv_freq, self.attention_factor = inv_freq_and_scale(dim, params, max_position)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.interleaved = interleaved

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape [T, d/2], already times the attention factor."""
        return rotary_cos_sin(positions, self.inv_freq, self.attention_factor)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the registry's rotary_embedding: the torch reference, or a verified one-kernel version
        rotary = kernel("rotary_embedding", q)
        return rotary(positions, q, k, self.inv_freq, self.attention_factor, self.interleaved)
