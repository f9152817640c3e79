"""Torch reference of the rotary position embedding as the models apply it (HF numerics).

Angles ``positions * inv_freq`` in fp32; cos / sin times the attention factor (YaRN's mscale,
1 otherwise), rounded to q's dtype; each product and sum rounded to q's dtype as torch does.
``interleaved`` (DeepSeek's layout): the rotated pairs are (x[2i], x[2i+1]) and the output is
written as [rotated evens | rotated odds], the layout Hugging Face's DeepSeek-V3 produces (q
and k both, so q.k is that of the pairwise rotation).
"""

from __future__ import annotations

import torch


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` [T, d/2], times the attention factor."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.float()
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotary_embedding_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated: q ``[T, Hq, d]``, k ``[T, Hk, d]``, positions ``[T]``, inv_freq ``[d / 2]``."""
    cos, sin = rotary_cos_sin(positions, inv_freq, attention_factor)
    cos, sin = cos.to(q.dtype).unsqueeze(1), sin.to(q.dtype).unsqueeze(1)
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


__all__ = ["rotary_cos_sin", "rotary_embedding_ref"]
