"""The Hopper (sm_90a) MoE backend: CUTLASS grouped GEMMs (csrc/moe/sm90/).

* ``fused_moe`` backend ``cuda_sm90``: ``torch.ops.tokenspeed.fused_moe`` on CUDA tensors runs
  route map -> row gather (+ fp8 quantisation) -> grouped gate/up GEMM -> SiLU-and-mul (+ fp8
  quantisation) -> grouped down GEMM -> weighted combine, all on the device (no host sync,
  CUDA-graph capturable, deterministic). bf16 activations; bf16 or fp8 e4m3 experts with
  128x128 block scales.
* ``tokenspeed::grouped_gemm`` (:func:`grouped_gemm`): the grouped GEMM alone, for benchmarks
  and for engines that permute rows themselves; its fake (meta) implementation is here.
"""

from __future__ import annotations

import torch

from tokenspeed_kernels import registry
from tokenspeed_kernels.registry import Capability, Priority

HOPPER = Capability(frozenset({"nvidia"}), min_cc=(9, 0), max_cc=(9, 0))


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[start_g:end_g] = a[start_g:end_g] @ w[g].T`` for every group (expert) g.

    Args:
        a: ``[rows, k]`` rows sorted by group; bf16 (any float on CPU) or float8_e4m3fn.
        w: ``[groups, n, k]`` in a's dtype (each group's weight as stored by ``fused_moe``).
        offsets: int32 ``[groups]`` cumulative row ends (``torch._grouped_mm``'s ``offs``);
            made monotone (running maximum) and clamped to ``rows``. Rows at or past the
            last end come out zero.
        a_scale: fp8 only, float32 ``[rows, k / 128]``: ``a`` value * scale, per row and
            128-column group (k % 128 == 0).
        w_scale: fp8 only, float32 ``[groups, ceil(n / 128), ceil(k / 128)]`` 128x128 blocks.

    Returns:
        ``[rows, n]``: a's dtype, or bf16 for fp8 operands. fp32 accumulation.
    """
    return torch.ops.tokenspeed.grouped_gemm(a, w, offsets, a_scale, w_scale)


def _grouped_gemm_fake(a, w, offsets, a_scale=None, w_scale=None):  # type: ignore[no-untyped-def]
    dtype = torch.bfloat16 if a.dtype == torch.float8_e4m3fn else a.dtype
    return a.new_empty(a.shape[0], w.shape[1], dtype=dtype)


# The schema comes from csrc/moe/moe_grouped_gemm_cpu.cpp; an extension built before it
# existed must still import (calling the op then fails with torch's own message).
if hasattr(torch.ops.tokenspeed, "grouped_gemm"):
    torch.library.register_fake("tokenspeed::grouped_gemm")(_grouped_gemm_fake)


def register_moe_sm90_kernels(unavailable: str | None) -> None:
    """Register the sm90 MoE kernels (``unavailable``: why this build cannot run them, or None)."""
    registry.register(
        "fused_moe",
        "cuda_sm90",
        "tokenspeed_kernels.ops.moe:fused_moe",
        capability=HOPPER,
        dtypes=(torch.bfloat16,),  # activations; experts bf16 or fp8 e4m3 with 128x128 block scales
        priority=Priority.SPECIALISED,  # tests/kernels/test_moe_sm90.py on the H100, 2026-11-23 (benchmarks/RESULTS.md)
        description="CUTLASS ptr-array grouped GEMMs (TMA + wgmma, fp8 blockwise), device-side routing map",
        unavailable=unavailable,
    )
