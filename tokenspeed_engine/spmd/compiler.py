"""Static SPMD compiler: walk a model's stages once at construction, insert the collectives.

A *stage* is a module that declares ``spmd_in`` and ``spmd_out`` (:class:`Layout`). A model
lists its stages in dataflow order (``spmd_chains()``); for every edge the compiler plans the
transition from the producer's output layout to the consumer's input layout and installs
it as a forward pre-hook on the consumer (a :class:`ResidualRMSNorm` consumer receives it
as ``spmd_input`` instead, so an all-reduce there fuses with the residual add and the
norm). The chain's end gets a post-hook to the requested output layout. Model code
therefore contains no communication.

Transition rules (a, b: sizes of the producer's and consumer's groups):
  a == b  Partial->Replicate: all_reduce; Partial->Shard(d): reduce_scatter(d);
          Shard(d)->Replicate: all_gather(d); Replicate->Shard(d): split(d) (local);
          equal placements: nothing; anything->Partial: refused (it would double count).
  a < b   replicate inside the small group, then all_gather the tokens (dim 0) over the
          cross group (one rank of each small replica), then place inside the big group.
  a > b   Partial: reduce_scatter the tokens over the cross group, then reduce inside the
          small group; otherwise replicate and split off this replica's tokens (local).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenspeed_engine.layers.kernels import kernel
from tokenspeed_engine.layers.norm import ResidualRMSNorm, rms_norm
from tokenspeed_engine.spmd import collectives as C
from tokenspeed_engine.spmd.groups import ParallelContext, ParallelGroup
from tokenspeed_engine.spmd.placement import Layout, Partial, Placement, Replicate, Shard

FUSED = "fused_allreduce_residual_rmsnorm"


class PlacementError(ValueError):
    """A transition the compiler cannot make (e.g. into Partial), or a stage without placements."""


@dataclass(frozen=True)
class CommOp:
    """One collective: kind in all_reduce / all_gather / reduce_scatter / split / fused_allreduce_residual_rmsnorm."""

    kind: str
    group: str  # a group name, or "cross(small,big)"
    dim: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}({self.group}" + (f", dim={self.dim})" if self.dim is not None else ")")


def _within(src: Placement, dst: Placement, group: str, size: int) -> list[CommOp]:
    if size == 1 or src == dst:
        return []
    if isinstance(dst, Partial):
        raise PlacementError(f"cannot turn {src} into Partial() on {group!r}: the sum would count it {size} times")
    if isinstance(src, Partial):
        return (
            [CommOp("all_reduce", group)] if isinstance(dst, Replicate) else [CommOp("reduce_scatter", group, dst.dim)]
        )
    if isinstance(src, Shard):
        ops = [CommOp("all_gather", group, src.dim)]
        return ops + ([CommOp("split", group, dst.dim)] if isinstance(dst, Shard) else [])
    return [CommOp("split", group, dst.dim)]  # Replicate -> Shard


def plan_transition(src: Layout, dst: Layout, sizes: dict[str, int]) -> list[CommOp]:
    """The collectives that turn a tensor laid out as ``src`` into ``dst`` (see the module doc)."""
    a, b = sizes[src.group], sizes[dst.group]
    if a == b:
        return _within(src.placement, dst.placement, dst.group, b)
    if a < b:
        cross = f"cross({src.group},{dst.group})"
        ops = _within(src.placement, Replicate(), src.group, a)
        return ops + [CommOp("all_gather", cross, 0)] + _within(Replicate(), dst.placement, dst.group, b)
    cross = f"cross({dst.group},{src.group})"
    if isinstance(src.placement, Partial):
        return [CommOp("reduce_scatter", cross, 0)] + _within(Partial(), dst.placement, dst.group, b)
    ops = _within(src.placement, Replicate(), src.group, a) + [CommOp("split", cross, 0)]
    return ops + _within(Replicate(), dst.placement, dst.group, b)


class TokenCounts:
    """How this forward's tokens are distributed over the replicas of every group size.

    The chains' entry hook calls :meth:`begin` with the token count of this rank's replica of
    the entry group (size e; one tiny all-gather over the world per forward, only in models
    with cross-group edges). A replica of a group of size s >= e holds the tokens of the
    entry replicas in its block, in rank order; a group of size s < e splits its entry
    replica's tokens evenly (``torch.tensor_split`` shares) among the e / s sub-replicas.
    """

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.by_rank: list[int] | None = None
        self.entry_size = 1

    def begin(self, local_rows: int, device: torch.device, entry_size: int) -> None:
        t = torch.tensor([local_rows], dtype=torch.int64, device=device)
        self.by_rank = C.all_gather(t, self.ctx.group("world"), 0).tolist()
        self.entry_size = entry_size

    def at(self, rank: int, size: int) -> int:
        """Tokens held by ``rank``'s replica of a group of ``size`` ranks."""
        if self.by_rank is None:
            raise RuntimeError("token counts unknown: the chain's entry stage did not run in this forward")
        e = self.entry_size
        if size >= e:
            start = rank - rank % size
            return sum(self.by_rank[j] for j in range(start, start + size, e))
        n, parts, i = self.by_rank[rank], e // size, (rank % e) // size
        return n // parts + (1 if i < n % parts else 0)

    def members(self, group: ParallelGroup, size: int) -> list[int]:
        """Tokens of each member of a cross group, whose members are replicas of a group of ``size``."""
        return [self.at(r, size) for r in group.ranks]


class CompiledTransition:
    """A planned transition bound to this process's groups; call it on a tensor."""

    def __init__(self, ops: list[CommOp], ctx: ParallelContext, counts: TokenCounts):
        self.ops = ops
        self.counts = counts
        self._groups = [self._resolve(op.group, ctx) for op in ops]
        # a cross group's members are replicas of its small group: their token counts come from there
        self._small = [ctx.sizes[op.group[6:].split(",")[0]] if op.group.startswith("cross(") else 0 for op in ops]

    @staticmethod
    def _resolve(name: str, ctx: ParallelContext) -> ParallelGroup:
        if name.startswith("cross("):
            small, big = name[6:-1].split(",")
            return ctx.cross_group(small, big)
        return ctx.group(name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for op, g, small in zip(self.ops, self._groups, self._small, strict=True):
            if op.kind == FUSED:
                raise RuntimeError("a fused residual-norm transition must be applied through residual_norm()")
            if op.kind == "all_reduce":
                x = C.all_reduce(x, g)
                continue
            counts = None
            if op.group.startswith("cross("):  # tokens move between replicas, which may hold different numbers
                counts = self.counts.members(g, small)
                have = counts[g.rank] if op.kind == "all_gather" else sum(counts)
                if x.shape[0] != have:
                    raise RuntimeError(f"{op}: {x.shape[0]} rows, but this forward's token counts say {have}")
            fn = {"all_gather": C.all_gather, "reduce_scatter": C.reduce_scatter, "split": C.split}[op.kind]
            x = fn(x, g, op.dim, counts)
        return x

    def residual_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the transition to x, add the residual and normalise (fused when the plan is one all-reduce)."""
        if len(self.ops) == 1 and self.ops[0].kind == FUSED:
            return C.fused_allreduce_residual_rmsnorm(x, residual, weight, eps, self._groups[0])
        x = self(x)
        if residual is not None:  # the add and the norm in one kernel where one is verified (the same sum)
            return kernel("fused_add_rms_norm", x)(x, residual, weight, eps)
        return rms_norm(x, weight, eps), x


@dataclass
class Edge:
    """One compiled edge, for inspection (``SpmdProgram.describe``)."""

    producer: str
    consumer: str
    src: Layout
    dst: Layout
    ops: list[CommOp]


@dataclass
class SpmdProgram:
    """What the compiler installed on a model: its edges, per chain."""

    ctx: ParallelContext
    edges: dict[str, list[Edge]] = field(default_factory=dict)

    def describe(self) -> list[str]:
        """One line per edge: ``chain: producer -> consumer: src => dst: ops``."""
        return [
            f"{chain}: {e.producer} -> {e.consumer}: {e.src} => {e.dst}: [{', '.join(map(str, e.ops))}]"
            for chain, edges in self.edges.items()
            for e in edges
        ]

    def collective_ops(self) -> list[CommOp]:
        return [op for edges in self.edges.values() for e in edges for op in e.ops]

    def collectives(self) -> list[str]:
        """Every emitted collective in order, e.g. ``all_reduce(attn)``."""
        return [str(op) for op in self.collective_ops()]


def _layouts(name: str, module: nn.Module) -> tuple[Layout, Layout]:
    try:
        return module.spmd_in, module.spmd_out
    except AttributeError as exc:
        raise PlacementError(f"SPMD stage {name!r} ({type(module).__name__}) declares no spmd_in/spmd_out") from exc


Chains = dict[str, tuple[list[tuple[str, nn.Module]], Layout]]


def plan_chains(chains: Chains, sizes: dict[str, int]) -> dict[str, list[Edge]]:
    """Plan every edge of every chain (pure: nothing is bound or installed).

    ``chains`` maps a chain name to (stages in dataflow order, the layout wanted at its end).
    An edge into a :class:`ResidualRMSNorm` whose plan is a single all-reduce becomes the fused
    all-reduce + residual + RMSNorm. Residual norms must all sit on one layout, since the
    residual stream passes from norm to norm untouched.
    """
    planned: dict[str, list[Edge]] = {}
    for chain, (stages, output) in chains.items():
        edges: list[Edge] = []
        residual_layout = None
        for i, (name, module) in enumerate(stages):
            dst, _ = _layouts(name, module)
            if isinstance(module, ResidualRMSNorm):
                if residual_layout not in (None, dst):
                    raise PlacementError(
                        f"residual norm {name!r} is on {dst}, the residual stream on {residual_layout}"
                    )
                residual_layout = dst
            if i == 0:
                continue
            prev_name, prev = stages[i - 1]
            src = _layouts(prev_name, prev)[1]
            try:
                ops = plan_transition(src, dst, sizes)
            except PlacementError as exc:
                raise PlacementError(f"{chain}: {prev_name} -> {name}: {exc}") from exc
            if isinstance(module, ResidualRMSNorm) and [o.kind for o in ops] == ["all_reduce"]:
                ops = [CommOp(FUSED, ops[0].group)]
            edges.append(Edge(prev_name, name, src, dst, ops))
        last_name, last = stages[-1]
        src = _layouts(last_name, last)[1]
        edges.append(Edge(last_name, "<output>", src, output, plan_transition(src, output, sizes)))
        planned[chain] = edges
    return planned


def compile_chains(chains: Chains, ctx: ParallelContext) -> SpmdProgram:
    """Plan the chains (:func:`plan_chains`) and install the transitions on their modules.

    An edge's transition becomes a forward pre-hook of its consumer (``spmd_input`` of a
    residual norm); the end of a chain gets a post-hook. A module shared by chains (the
    embedding, the LM head) must receive the same transition in each, else PlacementError.
    """
    program = SpmdProgram(ctx, plan_chains(chains, ctx.sizes))
    counts = TokenCounts(ctx)
    installed: dict[tuple[int, bool], list[CommOp]] = {}
    modules = {name: m for stages, _ in chains.values() for name, m in stages}
    for edges in program.edges.values():
        for e in edges:
            post = e.consumer == "<output>"
            module = modules[e.producer if post else e.consumer]
            key = (id(module), post)
            if key in installed:
                if installed[key] != e.ops:
                    raise PlacementError(f"stage {e.consumer!r} is shared by chains that need different transitions")
                continue
            installed[key] = e.ops
            tr = CompiledTransition(e.ops, ctx, counts)
            if isinstance(module, ResidualRMSNorm) and not post:
                module.spmd_input = tr
            elif e.ops and post:
                module.register_forward_hook(lambda _m, _a, out, tr=tr: tr(out))
            elif e.ops:
                module.register_forward_pre_hook(lambda _m, args, tr=tr: (tr(args[0]), *args[1:]))
    if any(op.group.startswith("cross(") for op in program.collective_ops()):
        # Data-parallel replicas hold different tokens: exchange the counts once per forward,
        # when the chains' first stage (the embedding) sees this forward's token ids.
        entries = {id(stages[0][1]): stages[0][1] for stages, _ in chains.values()}
        for module in entries.values():
            size = ctx.sizes[module.spmd_in.group]
            module.register_forward_pre_hook(
                lambda _m, args, size=size: counts.begin(args[0].shape[0], args[0].device, size)
            )
    return program


def compile_model(model: Any, ctx: ParallelContext) -> SpmdProgram:
    """Compile ``model.spmd_chains()`` (see :func:`compile_chains`)."""
    return compile_chains(model.spmd_chains(), ctx)
