"""Linear layers, replicated or split over a parallel group (Megatron style).

Each parameter carries a ``weight_loader(param, source, shard_id)`` that copies its slice of
a checkpoint tensor (a :class:`TensorSource`, read lazily) and ``expected_shards`` (the
shard ids a complete load delivers), so the loader can name any missing tensor.
Checkpoint weights are ``[out_features, in_features]`` as in Hugging Face.

Placements: a column-parallel layer maps ``Replicate`` to ``Shard(-1)`` (its own output
columns); a row-parallel one maps ``Shard(-1)`` to ``Partial`` (bias added on rank 0 only).
These layers sit inside SPMD stages (attention, MLP), which declare the stage boundary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenspeed_engine.loader.source import TensorSource, check_shape
from tokenspeed_engine.spmd.groups import ParallelGroup


def _param(shape: tuple[int, ...], dtype: torch.dtype | None, device: Any) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def copy_into(param: torch.Tensor, src: TensorSource, dest: torch.Tensor | None = None) -> None:
    """Copy a (narrowed) source into ``dest`` (default: the whole param), checking the shape."""
    dest = param.data if dest is None else dest
    check_shape(src, tuple(dest.shape), f"parameter slice of shape {list(dest.shape)}")
    dest.copy_(src.load().to(dest.dtype))


def load_replicated(param: nn.Parameter, src: TensorSource, shard_id: Any = None) -> None:
    copy_into(param, src)


class Linear(nn.Module):
    """Replicated linear layer: every rank holds the whole weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: Any = None, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(self._weight_shape(), dtype, device)
        self.weight.weight_loader = self.load_weight
        self.bias = _param((self._weight_shape()[0],), dtype, device) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.load_bias

    def _weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def load_weight(self, param: nn.Parameter, src: TensorSource, shard_id: Any = None) -> None:
        copy_into(param, src)

    def load_bias(self, param: nn.Parameter, src: TensorSource, shard_id: Any = None) -> None:
        copy_into(param, src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(Linear):
    """Output features split over ``group``; ``output_sizes`` lists fused outputs split separately.

    With ``output_sizes=[a, b]`` (e.g. gate and up) rank r holds rows ``[r*a/g, (r+1)*a/g)`` of
    the first and likewise of the second, concatenated; shard ids are the list indices.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: int | list[int],
        group: ParallelGroup,
        bias: bool = False,
        dtype: Any = None,
        device: Any = None,
    ):
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.group = group
        for size in self.output_sizes:
            if size % group.size:
                raise ValueError(f"output size {size} does not split over {group.size} ranks of {group.name!r}")
        super().__init__(in_features, sum(self.output_sizes), bias, dtype, device)
        self.local_sizes = [s // group.size for s in self.output_sizes]
        if len(self.output_sizes) > 1:
            self.weight.expected_shards = tuple(range(len(self.output_sizes)))
            if self.bias is not None:
                self.bias.expected_shards = self.weight.expected_shards

    def _weight_shape(self) -> tuple[int, int]:
        return (sum(self.output_sizes) // self.group.size, self.in_features)

    def _load(self, param: nn.Parameter, src: TensorSource, shard_id: Any, full_cols: tuple[int, ...]) -> None:
        idx = 0 if shard_id is None else int(shard_id)
        if shard_id is None and len(self.output_sizes) > 1:
            raise ValueError(f"{src.name}: a fused column-parallel weight needs a shard id")
        check_shape(src, (self.output_sizes[idx], *full_cols), "the column-parallel layer")
        local = self.local_sizes[idx]
        dest = param.data.narrow(0, sum(self.local_sizes[:idx]), local)
        copy_into(param, src.narrow(0, self.group.rank * local, local), dest)

    def load_weight(self, param: nn.Parameter, src: TensorSource, shard_id: Any = None) -> None:
        self._load(param, src, shard_id, (self.in_features,))

    def load_bias(self, param: nn.Parameter, src: TensorSource, shard_id: Any = None) -> None:
        self._load(param, src, shard_id, ())


class RowParallelLinear(Linear):
    """Input features split over ``group``; the output is a partial sum (bias on group rank 0)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: ParallelGroup,
        bias: bool = False,
        dtype: Any = None,
        device: Any = None,
    ):
        if in_features % group.size:
            raise ValueError(f"input size {in_features} does not split over {group.size} ranks of {group.name!r}")
        self.group = group
        super().__init__(in_features, out_features, bias, dtype, device)

    def _weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features // self.group.size)

    def load_weight(self, param: nn.Parameter, src: TensorSource, shard_id: Any = None) -> None:
        check_shape(src, (self.out_features, self.in_features), "the row-parallel layer")
        local = self.in_features // self.group.size
        copy_into(param, src.narrow(1, self.group.rank * local, local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.group.rank == 0 else None
        return F.linear(x, self.weight, bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads; KV heads are replicated when fewer than ranks.

    Shard ids "q", "k", "v". Rank r holds query heads ``[r*H/g, (r+1)*H/g)`` and the KV heads
    those queries use.
    """

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        group: ParallelGroup,
        bias: bool = False,
        dtype: Any = None,
        device: Any = None,
    ):
        g = group.size
        if num_heads % g or (num_kv_heads % g and g % num_kv_heads):
            raise ValueError(f"{num_heads} query / {num_kv_heads} KV heads do not split over {g} ranks")
        self.head_dim = head_dim
        self.local_heads = num_heads // g
        self.local_kv_heads = max(1, num_kv_heads // g)
        self.kv_start = (group.rank * num_kv_heads // g) if num_kv_heads >= g else group.rank // (g // num_kv_heads)
        self.full = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        local_kv = self.local_kv_heads * head_dim
        super().__init__(hidden, [num_heads * head_dim, local_kv * g, local_kv * g], group, bias, dtype, device)
        self.local_sizes = [self.local_heads * head_dim, local_kv, local_kv]
        self.weight.expected_shards = ("q", "k", "v")
        if self.bias is not None:
            self.bias.expected_shards = ("q", "k", "v")

    def _load(self, param: nn.Parameter, src: TensorSource, shard_id: Any, full_cols: tuple[int, ...]) -> None:
        check_shape(src, (self.full[shard_id], *full_cols), f"the {shard_id} projection")
        idx = "qkv".index(shard_id)
        local = self.local_sizes[idx]
        start = self.group.rank * local if shard_id == "q" else self.kv_start * self.head_dim
        dest = param.data.narrow(0, sum(self.local_sizes[:idx]), local)
        copy_into(param, src.narrow(0, start, local), dest)
