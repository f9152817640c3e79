"""Named parallel groups over the ranks of one model replica set.

Every group is a contiguous block of ranks: a group of size g splits the world into
``world_size // g`` replicas, rank r sitting in block ``r // g`` at index ``r % g``.
Groups of equal size therefore hold the same ranks, so a transition between them is an
all-reduce; groups of unequal size meet through the *cross group* (the ranks of a larger
block that share an index inside the smaller one), over which tokens are gathered or
reduce-scattered.

The names the models use:
  ``attn``  attention tensor parallelism (heads); also embedding, norms, LM head
  ``dense`` tensor parallelism of dense MLPs (DeepSeek's first-k dense layers, Llama's MLP)
  ``moe``   the MoE group, ``moe_tp * moe_ep`` ranks: experts split over ``moe_ep``,
            each expert's intermediate dimension over ``moe_tp``
  ``world`` every rank
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the parallel groups; None means "the whole world"."""

    world_size: int = 1
    attn_tp: int | None = None
    dense_tp: int | None = None
    moe_tp: int | None = None  # None: world_size // moe_ep
    moe_ep: int = 1

    def sizes(self) -> dict[str, int]:
        """Resolved group sizes, validated: every size divides the world and, of any two, one divides the other."""
        w = self.world_size
        moe_tp = self.moe_tp if self.moe_tp is not None else w // self.moe_ep
        sizes = {
            "world": w,
            "attn": self.attn_tp or w,
            "dense": self.dense_tp or w,
            "moe": moe_tp * self.moe_ep,
        }
        for name, size in sizes.items():
            if size < 1 or w % size:
                raise ValueError(f"parallel group {name!r} of size {size} does not divide world_size {w}")
        for a in sizes.values():
            for b in sizes.values():
                if a <= b and b % a:
                    raise ValueError(f"group sizes {a} and {b} do not nest (one must divide the other): {sizes}")
        return sizes | {"moe_tp": moe_tp, "moe_ep": self.moe_ep}


@dataclass(frozen=True)
class ParallelGroup:
    """One group as seen from this process."""

    name: str
    ranks: tuple[int, ...]  # global ranks, ascending
    rank: int  # this process's index in ``ranks``
    process_group: Any = None  # torch.distributed ProcessGroup; None when the group has one rank

    @property
    def size(self) -> int:
        return len(self.ranks)


def _block(rank: int, size: int) -> tuple[int, ...]:
    start = rank - rank % size
    return tuple(range(start, start + size))


def _cross(rank: int, small: int, big: int) -> tuple[int, ...]:
    start = rank - rank % big
    return tuple(range(start + rank % small, start + big, small))


class ParallelContext:
    """The groups of this process; build with :meth:`single` or :meth:`from_distributed`."""

    def __init__(self, config: ParallelConfig, rank: int, process_groups: dict[tuple[int, ...], Any]):
        self.config = config
        self.sizes = config.sizes()
        self.rank = rank
        self.world_size = config.world_size
        self._pgs = process_groups

    @classmethod
    def single(cls) -> ParallelContext:
        """One process, every group of size 1 (no torch.distributed needed)."""
        return cls(ParallelConfig(world_size=1), 0, {})

    @classmethod
    def from_distributed(cls, config: ParallelConfig | None = None) -> ParallelContext:
        """Create every group (and cross group) on an initialised torch.distributed world.

        Collective: every rank must call it with the same config, since ``dist.new_group``
        is called for every group in the same order on all ranks.
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelContext.from_distributed: torch.distributed is not initialised")
        world = dist.get_world_size()
        config = config or ParallelConfig(world_size=world)
        if config.world_size != world:
            raise ValueError(f"ParallelConfig.world_size={config.world_size} but torch.distributed has {world} ranks")
        sizes = sorted({s for k, s in config.sizes().items() if k in ("world", "attn", "dense", "moe")})
        wanted: list[tuple[int, ...]] = []
        for s in sizes:
            wanted += [tuple(range(b, b + s)) for b in range(0, world, s)]
        for a in sizes:
            for b in sizes:
                if a < b:
                    wanted += [_cross(r, a, b) for r in range(world) if r % b < a]
        pgs: dict[tuple[int, ...], Any] = {}
        for ranks in wanted:  # same order on every rank
            if len(ranks) > 1 and ranks not in pgs:
                pgs[ranks] = dist.new_group(list(ranks))
        return cls(config, dist.get_rank(), pgs)

    def _make(self, name: str, ranks: tuple[int, ...]) -> ParallelGroup:
        pg = self._pgs.get(ranks) if len(ranks) > 1 else None
        if len(ranks) > 1 and pg is None:
            raise RuntimeError(f"no process group was created for {name} ranks {ranks}")
        return ParallelGroup(name, ranks, ranks.index(self.rank), pg)

    def group(self, name: str) -> ParallelGroup:
        """The named group ("attn", "dense", "moe", "world") containing this rank."""
        if name not in ("world", "attn", "dense", "moe"):
            raise KeyError(f"unknown parallel group {name!r}")
        return self._make(name, _block(self.rank, self.sizes[name]))

    def cross_group(self, small: str, big: str) -> ParallelGroup:
        """Ranks of this rank's ``big`` block that share its index inside ``small`` (one per ``small`` replica)."""
        a, b = self.sizes[small], self.sizes[big]
        if a >= b:
            raise ValueError(f"cross_group({small!r}, {big!r}) needs a smaller first group ({a} vs {b})")
        return self._make(f"cross({small},{big})", _cross(self.rank, a, b))

    # MoE sub-ranks: within the moe group, index = ep_rank * moe_tp + tp_rank.
    @property
    def moe_tp_size(self) -> int:
        return self.sizes["moe_tp"]

    @property
    def moe_ep_size(self) -> int:
        return self.sizes["moe_ep"]

    @property
    def moe_tp_rank(self) -> int:
        return self.group("moe").rank % self.moe_tp_size

    @property
    def moe_ep_rank(self) -> int:
        return self.group("moe").rank // self.moe_tp_size

    def __repr__(self) -> str:
        return f"ParallelContext(rank={self.rank}, sizes={self.sizes})"
