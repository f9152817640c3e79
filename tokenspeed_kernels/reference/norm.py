"""Torch references of the elementwise ops a forward pass needs between the big kernels:
RMSNorm (plain, and with the residual add fused in) and SiLU-and-mul.

Hugging Face numerics, which the models' logits are tested against: RMSNorm normalises in fp32,
rounds to x's dtype, then multiplies by the weight in that dtype; the residual add happens in
x's dtype; SiLU rounds to x's dtype before the multiply. On float64 inputs they are the tests'
oracles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dim, normalised in fp32 (fp64 for fp64 inputs)."""
    h = x.double() if x.dtype == torch.float64 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the pre-norm residual stream of a decoder layer."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused ``[..., 2N]`` = ``[gate | up]`` tensor: ``silu(gate) * up``, ``[..., N]``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


__all__ = ["fused_add_rms_norm_ref", "rms_norm_ref", "silu_and_mul_ref"]
