"""Kernel selection through ``tokenspeed_kernels.registry``.

Layers call ``kernel("mla_decode", q)(...)``: the registry picks the best implementation for
the tensor's device and dtype (the CUDA kernels on Hopper, the C++ reference on CPU), so model
code never names a device. Selection runs on every call (the registry caches its answers), so
``registry.use_backend`` and ``TOKENSPEED_KERNEL_BACKEND`` take effect at once. Kernels of
priority UNVERIFIED (written, never run on the hardware) are not used unless forced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from tokenspeed_kernels import registry


@functools.cache
def _device_info(device: torch.device) -> registry.DeviceInfo:
    return registry.DeviceInfo.of(device)


def kernel(op: str, like: torch.Tensor, **traits: Any) -> Callable[..., Any]:
    """The registry's choice of ``op`` for tensors like ``like`` (its device and dtype) and the
    call's shape ``traits`` (e.g. page_size, heads, q_len), so a kernel that cannot take the
    shape is refused up front and the next best one serves."""
    device = like.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return registry.select(op, device=_device_info(device), dtype=like.dtype, verified_only=True, **traits)
