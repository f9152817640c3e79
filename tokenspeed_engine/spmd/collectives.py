"""The collectives the SPMD compiler inserts, on ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Every function is the identity on a one-rank group. Token-dimension collectives over a
cross group take ``counts`` (rows held by each member, in member order) because data-parallel
replicas may hold different numbers of tokens; rows are padded to the largest count on the
wire and the padding is dropped on arrival.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tokenspeed_engine.layers.norm import rms_norm
from tokenspeed_engine.spmd.groups import ParallelGroup

# torch >= 2.13 names them *_single; older releases (the GPU images) have the *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    """Sum over the group; works in place on a contiguous x (producers hand over fresh tensors)."""
    if group.size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group.process_group)
    return x


def all_gather(x: torch.Tensor, group: ParallelGroup, dim: int, counts: list[int] | None = None) -> torch.Tensor:
    """Concatenate every member's x along ``dim`` in member order (``counts``: rows per member, dim 0 only)."""
    if group.size == 1:
        return x
    if counts is not None and len(set(counts)) > 1:
        if dim != 0:
            raise ValueError("all_gather with unequal counts is only defined along dim 0 (tokens)")
        pad = max(counts)
        padded = torch.cat([x, x.new_zeros(pad - x.shape[0], *x.shape[1:])]) if x.shape[0] < pad else x
        out = all_gather(padded, group, 0)
        return torch.cat([out[i * pad : i * pad + n] for i, n in enumerate(counts)])
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty(group.size * moved.shape[0], *moved.shape[1:])
    _all_gather_single(out, moved, group=group.process_group)
    return out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, group: ParallelGroup, dim: int, counts: list[int] | None = None) -> torch.Tensor:
    """Sum over the group, then keep this member's slice along ``dim`` (``counts``: rows per member, dim 0)."""
    if group.size == 1:
        return x
    if counts is not None and len(set(counts)) > 1:
        if dim != 0:
            raise ValueError("reduce_scatter with unequal counts is only defined along dim 0 (tokens)")
        pad = max(counts)
        pieces = torch.split(x, counts)
        padded = torch.cat([torch.cat([p, p.new_zeros(pad - p.shape[0], *p.shape[1:])]) for p in pieces])
        return reduce_scatter(padded, group, 0)[: counts[group.rank]]
    moved = x.movedim(dim, 0).contiguous()
    if moved.shape[0] % group.size:
        raise ValueError(f"reduce_scatter: dim {dim} of size {moved.shape[0]} does not split over {group.size} ranks")
    out = moved.new_empty(moved.shape[0] // group.size, *moved.shape[1:])
    _reduce_scatter_single(out, moved, group=group.process_group)
    return out.movedim(0, dim)


def split(x: torch.Tensor, group: ParallelGroup, dim: int, counts: list[int] | None = None) -> torch.Tensor:
    """This member's slice along ``dim`` of a tensor every member holds whole (no communication)."""
    if group.size == 1:
        return x
    if counts is not None:
        start = sum(counts[: group.rank])
        return x.narrow(dim, start, counts[group.rank])
    return x.chunk(group.size, dim=dim)[group.rank]


def fused_allreduce_residual_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, group: ParallelGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = allreduce(x) + residual; return rmsnorm(r), r``.

    One fused kernel on GPUs where a backend provides it (e.g. a one-shot all-reduce that
    applies the residual and norm on arrival); composed from the parts here, which is what
    gloo and NCCL without such a kernel do.
    """
    x = all_reduce(x, group)
    if residual is not None:
        x = x + residual
    return rms_norm(x, weight, eps), x
