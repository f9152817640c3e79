"""Placements: how one logical tensor is laid out over the ranks of a parallel group.

A module boundary declares a :class:`Layout` (a named group and a placement) for the
activation that enters it and the one that leaves it. Between two layouts the SPMD
compiler (:mod:`tokenspeed_engine.spmd.compiler`) inserts whatever collective turns one
into the other.

Across *replicas* of a group (when the group is smaller than the world, e.g. attention
data parallelism with attention TP 1), the token dimension (dim 0) is split: each replica
holds its own tokens. That is implicit in every layout and is what makes transitions
between groups of unequal size need all-gather / reduce-scatter instead of all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Replicate:
    """Every rank of the group holds the whole tensor."""

    def __str__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True)
class Shard:
    """Rank i of the group holds the i-th equal slice along ``dim``."""

    dim: int

    def __str__(self) -> str:
        return f"Shard({self.dim})"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a summand; the logical tensor is the sum over the group."""

    def __str__(self) -> str:
        return "Partial()"


Placement = Replicate | Shard | Partial


@dataclass(frozen=True)
class Layout:
    """A placement on a named parallel group ("attn", "dense", "moe", or "world")."""

    group: str
    placement: Placement

    def __str__(self) -> str:
        return f"{self.placement}@{self.group}"
