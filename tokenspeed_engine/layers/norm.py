"""RMSNorm (plain, and with the residual stream fused in), with Hugging Face numerics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenspeed_engine.layers.kernels import kernel
from tokenspeed_engine.spmd.placement import Layout, Replicate


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)``, normalised in fp32 and cast back before the weight (as HF does);
    the registry's ``rms_norm`` (the torch reference, or a verified fused kernel)."""
    return kernel("rms_norm", x)(x, weight, eps)


class RMSNorm(nn.Module):
    """Plain RMSNorm: ``forward(x) -> normed``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ResidualRMSNorm(RMSNorm):
    """RMSNorm on the residual stream: ``forward(x, residual) -> (normed, x + residual)``.

    An SPMD stage replicated on ``group``. When the producer of x leaves it Partial, the
    compiler sets ``spmd_input`` and the reduction, the residual add and the norm run as
    one fused collective (``fused_allreduce_residual_rmsnorm``).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, group: str = "attn", **kw: Any):
        super().__init__(hidden_size, eps, **kw)
        self.spmd_in = self.spmd_out = Layout(group, Replicate())
        self.spmd_input: Any = None  # set by the SPMD compiler: a CompiledTransition

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spmd_input is not None:
            return self.spmd_input.residual_norm(x, residual, self.weight, self.eps)
        if residual is not None:  # (rms_norm(x + residual), x + residual), one kernel when fused
            return kernel("fused_add_rms_norm", x)(x, residual, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps), x
