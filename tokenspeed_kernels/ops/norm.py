"""RMSNorm, RMSNorm with the residual add fused in, and SiLU-and-mul as public ops
(``torch.ops.tokenspeed.rms_norm`` / ``fused_add_rms_norm`` / ``silu_and_mul``).

Defined here (Python schemas, fragments of the ``tokenspeed`` library) with a CPU
implementation (the torch reference), a CUDA implementation (the Triton kernels) and a fake,
so other engines can call them, ``torch.compile(fullgraph=True)`` traces them, and CUDA graphs
capture them (no host sync, no allocation that depends on values).
"""

from __future__ import annotations

import torch

from tokenspeed_kernels.reference.norm import fused_add_rms_norm_ref, rms_norm_ref, silu_and_mul_ref

FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
CUDA_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
MAX_NORM_DIM = 16384  # the Triton kernel keeps one row in registers

torch.library.define("tokenspeed::rms_norm", "(Tensor x, Tensor weight, float eps) -> Tensor")
torch.library.define(
    "tokenspeed::fused_add_rms_norm", "(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)"
)
torch.library.define("tokenspeed::silu_and_mul", "(Tensor x) -> Tensor")


def check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """The elementwise ops' dtypes: bf16/fp16/fp32, and fp64 on the CPU (the tests' oracles)."""
    allowed = CUDA_FLOATS if t.is_cuda else FLOATS
    if t.dtype not in allowed:
        raise ValueError(f"{op}: {name} must be one of {', '.join(str(d) for d in allowed)}, got {t.dtype}")


def check_norm_args(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> None:
    """Dtype, device, shape and stride checks; every message names the argument."""
    check_float_dtype(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., hidden] with hidden >= 1, got shape {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{op}: weight must be [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")
    if x.is_cuda and x.shape[-1] > MAX_NORM_DIM:
        raise ValueError(f"{op}: hidden = {x.shape[-1]} > {MAX_NORM_DIM} is not supported by the CUDA kernel")
    if x.stride(-1) != 1 and x.numel() > 0:
        raise ValueError(f"{op}: x must be contiguous in its last dimension, got strides {x.stride()}")
    tensors = [("weight", weight)]
    if residual is not None:
        if residual.dtype != x.dtype:
            raise ValueError(f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.stride(-1) != 1 and residual.numel() > 0:
            raise ValueError(f"{op}: residual must be contiguous in its last dimension, got strides {residual.stride()}")
        tensors.append(("residual", residual))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def check_silu_and_mul_args(x: torch.Tensor) -> None:
    op = "silu_and_mul"
    check_float_dtype(op, "x", x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op}: x must be [..., 2 * N] ([gate | up]), got shape {tuple(x.shape)}")
    if x.stride(-1) != 1 and x.numel() > 0:
        raise ValueError(f"{op}: x must be contiguous in its last dimension, got strides {x.stride()}")


@torch.library.impl("tokenspeed::rms_norm", "CPU")
def _rms_norm_cpu(x, weight, eps):
    check_norm_args("rms_norm", x, weight, eps)
    return rms_norm_ref(x, weight, eps)


@torch.library.impl("tokenspeed::rms_norm", "CUDA")
def _rms_norm_cuda(x, weight, eps):
    check_norm_args("rms_norm", x, weight, eps)
    from tokenspeed_kernels.triton.norm import rms_norm as triton_rms_norm

    return triton_rms_norm(x, weight, eps)


@torch.library.register_fake("tokenspeed::rms_norm")
def _rms_norm_fake(x, weight, eps):
    check_norm_args("rms_norm", x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.impl("tokenspeed::fused_add_rms_norm", "CPU")
def _fused_add_rms_norm_cpu(x, residual, weight, eps):
    check_norm_args("fused_add_rms_norm", x, weight, eps, residual)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


@torch.library.impl("tokenspeed::fused_add_rms_norm", "CUDA")
def _fused_add_rms_norm_cuda(x, residual, weight, eps):
    check_norm_args("fused_add_rms_norm", x, weight, eps, residual)
    from tokenspeed_kernels.triton.norm import fused_add_rms_norm as triton_fused

    return triton_fused(x, residual, weight, eps)


@torch.library.register_fake("tokenspeed::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    check_norm_args("fused_add_rms_norm", x, weight, eps, residual)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.impl("tokenspeed::silu_and_mul", "CPU")
def _silu_and_mul_cpu(x):
    check_silu_and_mul_args(x)
    return silu_and_mul_ref(x).contiguous()


@torch.library.impl("tokenspeed::silu_and_mul", "CUDA")
def _silu_and_mul_cuda(x):
    check_silu_and_mul_args(x)
    from tokenspeed_kernels.triton.norm import silu_and_mul as triton_silu_and_mul

    return triton_silu_and_mul(x)


@torch.library.register_fake("tokenspeed::silu_and_mul")
def _silu_and_mul_fake(x):
    check_silu_and_mul_args(x)
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with Hugging Face numerics.

    Args:
        x: ``[..., hidden]`` bf16/fp16/fp32 (fp64 on the CPU), last dim contiguous (rows may be
            strided, e.g. a column slice of a wider projection). CUDA: hidden <= 16384.
        weight: ``[hidden]``, x's dtype.
        eps: added to the mean of squares, finite and >= 0.

    Returns:
        ``[..., hidden]`` contiguous, x's dtype: ``weight * (x * rsqrt(mean(x^2) + eps))``, the
        normalisation in fp32 and rounded to x's dtype before the weight (as HF does).
    """
    return torch.ops.tokenspeed.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual stream in one pass: ``s = x + residual`` (in x's dtype), then
    ``(rms_norm(s, weight, eps), s)``. ``residual``: x's shape and dtype, last dim contiguous;
    other arguments as ``rms_norm``. Both outputs are new contiguous tensors."""
    return torch.ops.tokenspeed.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused projection: x ``[..., 2N]`` = ``[gate | up]`` (bf16/fp16/fp32, last dim
    contiguous) -> ``[..., N]`` contiguous = ``silu(gate) * up``, silu rounded to x's dtype first."""
    return torch.ops.tokenspeed.silu_and_mul(x)


__all__ = ["check_float_dtype", "check_norm_args", "check_silu_and_mul_args", "fused_add_rms_norm", "rms_norm", "silu_and_mul"]
