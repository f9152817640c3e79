"""TokenSpeed kernels: MLA attention and MoE ops for Hopper, with a backend registry.

Public ops are ``torch.ops.tokenspeed.*`` (stable schemas, usable from any engine) and
their documented wrappers here. ``tokenspeed_kernels.registry`` selects among backends.
"""

from __future__ import annotations

import json

import torch

try:
    from tokenspeed_kernels import _C  # noqa: F401  (registers the op schemas and kernels)
except ImportError as exc:  # keep the original error visible
    raise ImportError(
        f"tokenspeed_kernels: the compiled extension tokenspeed_kernels._C failed to load: {exc}. "
        "Build it with `make build` (or `pip install --no-build-isolation -e .`)."
    ) from exc

from tokenspeed_kernels import (
    _fake,  # noqa: E402,F401  (fake implementations for torch.compile)
    registry,  # noqa: E402
)
from tokenspeed_kernels.backends import register_builtin_kernels  # noqa: E402
from tokenspeed_kernels.ops import fused_moe, merge_attn_states, mla_decode, mla_prefill, moe_route  # noqa: E402


def build_info() -> dict:
    """What the compiled extension contains: ``{"cuda": bool, "cuda_archs": "90a"}``."""
    return json.loads(torch.ops.tokenspeed.build_info())


register_builtin_kernels(built_with_cuda=build_info()["cuda"])

__all__ = [
    "build_info",
    "fused_moe",
    "merge_attn_states",
    "mla_decode",
    "mla_prefill",
    "moe_route",
    "registry",
]
