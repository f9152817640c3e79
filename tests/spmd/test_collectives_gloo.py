"""Every planned transition, executed on 2 (and 4) gloo processes, yields the layout it promises.

The logical tensor is the token set of all data-parallel replicas; a rank's local view of a
layout is the tokens of its group's block, then its shard / summand / copy inside the group.
Replicas hold different numbers of tokens, so unequal-size gathers are exercised.
"""

from __future__ import annotations

import pytest
import torch

from tests.spmd.dist_utils import run_distributed
from tokenspeed_engine.layers.norm import rms_norm
from tokenspeed_engine.spmd import Layout, ParallelConfig, ParallelContext, Partial, Replicate, Shard
from tokenspeed_engine.spmd.compiler import CompiledTransition, TokenCounts, plan_transition

R, P = Replicate(), Partial()


def local_view(rows_by_replica: list[torch.Tensor], layout: Layout, ctx: ParallelContext, finest: int):
    """This rank's part of the logical tensor under ``layout`` (replicas of the ``finest`` group size)."""
    s = ctx.sizes[layout.group]
    block = ctx.rank // s
    per_block = s // finest
    x = torch.cat(rows_by_replica[block * per_block : (block + 1) * per_block])
    i, p = ctx.rank % s, layout.placement
    if isinstance(p, Shard):
        return x.chunk(s, dim=p.dim)[i]
    if isinstance(p, Partial):
        return x * (i + 1) / (s * (s + 1) / 2)  # summands that add up to x
    return x


def _check_all(rank: int, world: int, configs: list[tuple[dict, list]]) -> None:
    failures = []
    for cfg, cases in configs:
        ctx = ParallelContext.from_distributed(ParallelConfig(world_size=world, **cfg))
        finest = min(ctx.sizes[g] for g in ("attn", "moe", "dense"))
        counts_per_replica = [4 * (k + 1) for k in range(world // finest)]  # unequal token counts
        g = torch.Generator().manual_seed(0)
        rows = [torch.randn(n, 8, generator=g) for n in counts_per_replica]
        counts = TokenCounts(ctx)
        counts.begin(rows[rank // finest].shape[0], torch.device("cpu"), finest)
        for src, dst in cases:
            ops = plan_transition(src, dst, ctx.sizes)
            got = CompiledTransition(ops, ctx, counts)(local_view(rows, src, ctx, finest).clone())
            want = local_view(rows, dst, ctx, finest)
            if got.shape != want.shape or not torch.allclose(got, want, atol=1e-6):
                failures.append(f"{cfg}: {src} -> {dst} via {[str(o) for o in ops]}")
    assert not failures, "\n".join(failures)


def _cases(small: str, big: str) -> list:
    out = []
    for src in (R, P, Shard(0), Shard(1)):
        for dst in (R, Shard(0), Shard(1)):
            out.append((Layout(small, src), Layout(big, dst)))
            out.append((Layout(big, src), Layout(small, dst)))
    return out


def test_every_transition_on_two_ranks():
    configs = [
        ({"attn_tp": 2, "moe_tp": 2}, _cases("attn", "moe")),  # equal sizes
        ({"attn_tp": 1, "moe_tp": 2}, _cases("attn", "moe")),  # attention data parallel
        ({"attn_tp": 2, "dense_tp": 1}, _cases("dense", "attn")),  # token-split dense MLP
    ]
    # Shard(0) of a data-parallel group's tokens is not meaningful across unequal replicas
    configs[1] = (configs[1][0], [c for c in configs[1][1] if c[0].placement != Shard(0) or c[0].group == "moe"])
    configs[2] = (configs[2][0], [c for c in configs[2][1] if c[0].placement != Shard(0) or c[0].group == "attn"])
    run_distributed(_check_all, 2, configs)


def _fused(rank: int, world: int) -> None:
    ctx = ParallelContext.from_distributed(ParallelConfig(world_size=world))
    g = torch.Generator().manual_seed(1)
    x, residual, weight = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(16, generator=g)
    ops = plan_transition(Layout("attn", P), Layout("attn", R), ctx.sizes)
    tr = CompiledTransition([type(ops[0])("fused_allreduce_residual_rmsnorm", "attn")], ctx, TokenCounts(ctx))
    normed, new_residual = tr.residual_norm(x * (rank + 1) / 3, residual, weight, 1e-6)
    assert torch.allclose(new_residual, x + residual, atol=1e-6)
    assert torch.allclose(normed, rms_norm(x + residual, weight, 1e-6), atol=1e-5)


def test_fused_allreduce_residual_rmsnorm():
    run_distributed(_fused, 2)


@pytest.mark.slow
def test_nested_groups_on_four_ranks():
    """attention TP 2 inside a 4-rank MoE group: reduce-scatter over the cross group, then all-reduce."""
    run_distributed(
        _check_all,
        4,
        [
            (
                {"attn_tp": 2, "moe_tp": 4},
                [c for c in _cases("attn", "moe") if c[0].placement != Shard(0) or c[0].group == "moe"],
            )
        ],
    )
