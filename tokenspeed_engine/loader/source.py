"""TensorSource: a checkpoint tensor that is read only in the slice a rank needs.

Weight loaders narrow a source to their shard (``narrow``) and then ``load()`` it, so a
tensor-parallel rank reads 1/tp of each sharded weight from a safetensors file instead of
the whole tensor. In-memory tensors (dequantised fp8, GGUF) are wrapped the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class TensorSource:
    """A (possibly lazy) tensor: ``name``, ``shape``, ``dtype``, ``narrow()``, ``load()``."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        read: Callable[[tuple[slice, ...]], torch.Tensor],
        index: tuple[slice, ...] | None = None,
    ):
        self.name = name
        self.dtype = dtype
        self._read = read
        self._index = index if index is not None else tuple(slice(0, n) for n in shape)
        self.shape = tuple(s.stop - s.start for s in self._index)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, name: str = "") -> TensorSource:
        return cls(name, tuple(tensor.shape), tensor.dtype, lambda idx: tensor[idx])

    def narrow(self, dim: int, start: int, length: int) -> TensorSource:
        """The sub-tensor ``[start, start + length)`` along ``dim`` (nothing is read yet)."""
        dim = dim % len(self.shape)
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise IndexError(f"{self.name}: narrow({dim}, {start}, {length}) outside shape {list(self.shape)}")
        idx = list(self._index)
        base = idx[dim].start
        idx[dim] = slice(base + start, base + start + length)
        return TensorSource(self.name, self.shape, self.dtype, self._read, tuple(idx))

    def load(self) -> torch.Tensor:
        """Read the (narrowed) tensor into CPU memory."""
        return self._read(self._index)

    def __repr__(self) -> str:
        return f"TensorSource({self.name!r}, shape={list(self.shape)}, dtype={self.dtype})"


class ShapeMismatchError(ValueError):
    """A checkpoint tensor's shape differs from what the model expects."""


def check_shape(src: TensorSource, expected: tuple[int, ...], what: str) -> None:
    """Raise ShapeMismatchError naming the checkpoint tensor and the model parameter."""
    if tuple(src.shape) != tuple(expected):
        raise ShapeMismatchError(
            f"shape mismatch for checkpoint tensor {src.name!r}: it has {list(src.shape)}, "
            f"{what} expects {list(expected)}"
        )
