"""DeepSeek fp8 block-scale format: e4m3 weights, one fp32 ``weight_scale_inv`` per 128x128 block.

``weight = fp8_value * scale_inv[row // 128, col // 128]``. Linear layers are dequantised at
load time; MoE experts may stay fp8 (``fused_moe`` takes the scales).
"""

from __future__ import annotations

import torch

from tokenspeed_engine.loader.source import TensorSource

E4M3_MAX = 448.0


def dequantize_block_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[rows, cols] e4m3 with scale_inv [ceil(rows/b0), ceil(cols/b1)] -> ``dtype`` (computed in fp32)."""
    rows, cols = weight.shape
    expect = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(
            f"weight_scale_inv of shape {list(scale_inv.shape)} does not tile a {rows}x{cols} weight "
            f"in {block[0]}x{block[1]} blocks (expected {list(expect)})"
        )
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * s).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise [rows, cols] to e4m3 with per-block ``scale_inv = amax / 448`` (the checkpoints' recipe)."""
    rows, cols = weight.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(br * block[0], bc * block[1], dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(br, block[0], bc, block[1])
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12) / E4M3_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(br * block[0], bc * block[1])[:rows, :cols].contiguous(), scale


def dequantized_source(
    weight: TensorSource, scale_inv: TensorSource, block: tuple[int, int], dtype: torch.dtype
) -> TensorSource:
    """A source that reads both tensors whole and dequantises (shards are then sliced from it)."""
    cache: dict[str, torch.Tensor] = {}

    def read(idx: tuple[slice, ...]) -> torch.Tensor:
        if "w" not in cache:
            cache["w"] = dequantize_block_fp8(weight.load(), scale_inv.load(), block, dtype)
        return cache["w"][idx]

    return TensorSource(weight.name, weight.shape, dtype, read)
