"""Load a checkpoint into a model, each parameter sharded by its own ``weight_loader``.

The model supplies a mapper: ``map(checkpoint_name) -> [(param_name, shard_id), ...]`` or
None for tensors it deliberately ignores, and ``reverse(param_name, shard_id)`` giving the
checkpoint name a parameter shard comes from (for error messages). fp8 weights with a
``weight_scale_inv`` are dequantised unless the target parameter is itself fp8 (MoE
experts), in which case the scale goes to the parameter the mapper names for it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from tokenspeed_engine.layers.linear import copy_into
from tokenspeed_engine.loader.fp8 import dequantized_source
from tokenspeed_engine.loader.source import TensorSource

SCALE_SUFFIX = "weight_scale_inv"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class MissingTensorError(KeyError):
    """The checkpoint lacks tensors the model needs."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class UnexpectedTensorError(KeyError):
    """The checkpoint holds a tensor the model has no parameter for."""

    def __str__(self) -> str:
        return str(self.args[0])


class Checkpoint(Protocol):
    def names(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def get(self, name: str) -> TensorSource: ...


class WeightMapper(Protocol):
    def map(self, name: str) -> list[tuple[str, Any]] | None: ...
    def reverse(self, param: str, shard_id: Any) -> str: ...


def expected_shards(param: nn.Parameter) -> tuple[Any, ...]:
    return getattr(param, "expected_shards", (None,))


def load_weights(
    model: nn.Module,
    checkpoint: Checkpoint,
    mapper: WeightMapper,
    dtype: torch.dtype,
    fp8_block: tuple[int, int] = (128, 128),
    progress: bool = True,
) -> None:
    """Copy every checkpoint tensor into its parameter shard; raise on a missing or unexpected tensor.

    A parameter without ``weight_loader`` is copied whole. Shape mismatches raise
    :class:`tokenspeed_engine.loader.source.ShapeMismatchError` from the weight loaders.
    """
    params = dict(model.named_parameters())
    loaded: dict[str, set[Any]] = {name: set() for name in params}
    names = checkpoint.names()
    bar: Iterable[str] = tqdm(names, desc="loading weights", unit="tensor", file=sys.stderr, disable=not progress)
    for name in bar:
        targets = mapper.map(name)
        if targets is None:
            continue
        is_scale = name.endswith(SCALE_SUFFIX)
        for param_name, shard_id in targets:
            param = params.get(param_name)
            if param is None:
                if is_scale:
                    continue  # consumed when its weight was dequantised
                raise UnexpectedTensorError(
                    f"checkpoint tensor {name!r} maps to {param_name!r}, which this model does not have"
                )
            src = checkpoint.get(name)
            if src.dtype in FP8 and param.dtype not in FP8:
                scale_name = name[: -len("weight")] + SCALE_SUFFIX
                if not checkpoint.has(scale_name):
                    raise MissingTensorError(f"fp8 tensor {name!r} has no {scale_name!r} in the checkpoint")
                src = dequantized_source(src, checkpoint.get(scale_name), fp8_block, dtype)
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                copy_into(param, src)
            else:
                loader(param, src, shard_id)
            loaded[param_name].add(shard_id)
    missing = [
        f"{mapper.reverse(p, s)} (parameter {p}" + (f", shard {s!r})" if s is not None else ")")
        for p, param in params.items()
        for s in expected_shards(param)
        if s not in loaded[p]
    ]
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise MissingTensorError(f"checkpoint is missing {len(missing)} tensor(s) the model needs:\n  {shown}")
