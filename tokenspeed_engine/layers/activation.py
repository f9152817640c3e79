"""Activations."""

from __future__ import annotations

import torch

from tokenspeed_engine.layers.kernels import kernel


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] tensor: ``silu(gate) * up`` (halves the last dim); the
    registry's ``silu_and_mul`` (the torch reference, or a verified fused kernel)."""
    return kernel("silu_and_mul", x)(x)
