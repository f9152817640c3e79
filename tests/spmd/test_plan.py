"""The compiler's transition plans for every placement combination, and the chain compilation."""

from __future__ import annotations

import pytest
import torch

from tokenspeed_engine.layers.norm import ResidualRMSNorm
from tokenspeed_engine.spmd import Layout, ParallelConfig, ParallelContext, Partial, Replicate, Shard
from tokenspeed_engine.spmd.compiler import PlacementError, compile_chains, plan_chains, plan_transition

R, P = Replicate(), Partial()


def plan(src_group, src, dst_group, dst, sizes):
    return [str(op) for op in plan_transition(Layout(src_group, src), Layout(dst_group, dst), sizes)]


EQUAL = {"attn": 2, "moe": 2, "dense": 2, "world": 2}


@pytest.mark.parametrize(
    "src,dst,expected",
    [
        (P, R, ["all_reduce(moe)"]),
        (P, Shard(0), ["reduce_scatter(moe, dim=0)"]),
        (P, Shard(-1), ["reduce_scatter(moe, dim=-1)"]),
        (Shard(1), R, ["all_gather(moe, dim=1)"]),
        (R, Shard(1), ["split(moe, dim=1)"]),
        (Shard(0), Shard(1), ["all_gather(moe, dim=0)", "split(moe, dim=1)"]),
        (R, R, []),
        (Shard(1), Shard(1), []),
        (P, P, []),
    ],
)
def test_equal_group_sizes(src, dst, expected):
    assert plan("attn", src, "moe", dst, EQUAL) == expected


@pytest.mark.parametrize("src", [R, Shard(0)])
def test_into_partial_is_refused(src):
    with pytest.raises(PlacementError, match="Partial"):
        plan("attn", src, "moe", P, EQUAL)


def test_one_rank_groups_need_nothing():
    sizes = {"attn": 1, "moe": 1, "world": 1}
    for src in (R, P, Shard(0)):
        for dst in (R, Shard(1)):
            assert plan("attn", src, "moe", dst, sizes) == []


@pytest.mark.parametrize(
    "sizes,src_group,src,dst_group,dst,expected",
    [
        # attention data parallel (attn 1) into a 2-rank MoE and back
        ({"attn": 1, "moe": 2}, "attn", R, "moe", R, ["all_gather(cross(attn,moe), dim=0)"]),
        ({"attn": 1, "moe": 2}, "attn", P, "moe", R, ["all_gather(cross(attn,moe), dim=0)"]),
        ({"attn": 1, "moe": 2}, "moe", P, "attn", R, ["reduce_scatter(cross(attn,moe), dim=0)"]),
        ({"attn": 1, "moe": 2}, "moe", R, "attn", R, ["split(cross(attn,moe), dim=0)"]),
        (
            {"attn": 1, "moe": 2},
            "attn",
            R,
            "moe",
            Shard(1),
            ["all_gather(cross(attn,moe), dim=0)", "split(moe, dim=1)"],
        ),
        (
            {"attn": 1, "moe": 2},
            "moe",
            Shard(1),
            "attn",
            R,
            ["all_gather(moe, dim=1)", "split(cross(attn,moe), dim=0)"],
        ),
        # attention TP 2 inside a 4-rank MoE group
        ({"attn": 2, "moe": 4}, "attn", P, "moe", R, ["all_reduce(attn)", "all_gather(cross(attn,moe), dim=0)"]),
        ({"attn": 2, "moe": 4}, "moe", P, "attn", R, ["reduce_scatter(cross(attn,moe), dim=0)", "all_reduce(attn)"]),
        (
            {"attn": 2, "moe": 4},
            "moe",
            P,
            "attn",
            Shard(0),
            ["reduce_scatter(cross(attn,moe), dim=0)", "reduce_scatter(attn, dim=0)"],
        ),
        # the MoE smaller than attention (e.g. dense TP 1 under attention TP 2: token-split MLP)
        ({"attn": 2, "dense": 1}, "attn", R, "dense", R, ["split(cross(dense,attn), dim=0)"]),
        ({"attn": 2, "dense": 1}, "dense", P, "attn", R, ["all_gather(cross(dense,attn), dim=0)"]),
    ],
)
def test_unequal_group_sizes(sizes, src_group, src, dst_group, dst, expected):
    assert plan(src_group, src, dst_group, dst, sizes) == expected


class _Stage(torch.nn.Module):
    def __init__(self, group, src, dst):
        super().__init__()
        self.spmd_in, self.spmd_out = Layout(group, src), Layout(group, dst)

    def forward(self, x):
        return x


def test_chain_fuses_allreduce_into_the_residual_norm():
    stages = [
        ("emb", _Stage("attn", R, P)),
        ("norm1", ResidualRMSNorm(8, group="attn")),
        ("attn", _Stage("attn", R, P)),
        ("norm2", ResidualRMSNorm(8, group="attn")),
        ("moe", _Stage("moe", R, P)),
        ("norm3", ResidualRMSNorm(8, group="attn")),
        ("head", _Stage("attn", R, Shard(-1))),
    ]
    chains = {"main": (stages, Layout("attn", R))}
    edges = plan_chains(chains, {"attn": 2, "moe": 2, "world": 2})["main"]
    assert [(e.consumer, [str(o) for o in e.ops]) for e in edges] == [
        ("norm1", ["fused_allreduce_residual_rmsnorm(attn)"]),
        ("attn", []),
        ("norm2", ["fused_allreduce_residual_rmsnorm(attn)"]),
        ("moe", []),
        ("norm3", ["fused_allreduce_residual_rmsnorm(attn)"]),
        ("head", []),
        ("<output>", ["all_gather(attn, dim=-1)"]),
    ]
    # attention data parallel: the MoE's partial sums come back by reduce-scatter, not fused
    edges = plan_chains(chains, {"attn": 1, "moe": 2, "world": 2})["main"]
    assert [str(o) for e in edges for o in e.ops] == [
        "all_gather(cross(attn,moe), dim=0)",
        "reduce_scatter(cross(attn,moe), dim=0)",
    ]


def test_chain_plans_are_recorded_and_residual_layouts_checked():
    ctx = ParallelContext.single()
    a, b = ResidualRMSNorm(8, group="attn"), ResidualRMSNorm(8, group="moe")
    program = compile_chains({"main": ([("n1", a), ("s", _Stage("attn", R, P))], Layout("attn", R))}, ctx)
    assert program.describe() == [
        "main: n1 -> s: Replicate()@attn => Replicate()@attn: []",
        "main: s -> <output>: Partial()@attn => Replicate()@attn: []",
    ]
    with pytest.raises(PlacementError, match="residual"):
        plan_chains({"main": ([("n1", a), ("n2", b)], Layout("attn", R))}, ctx.sizes)
    with pytest.raises(PlacementError, match="declares no spmd_in"):
        plan_chains({"main": ([("n1", a), ("x", torch.nn.Linear(2, 2))], Layout("attn", R))}, ctx.sizes)


def test_parallel_config_validation():
    assert ParallelConfig(world_size=4, attn_tp=2, moe_ep=4).sizes() == {
        "world": 4,
        "attn": 2,
        "dense": 4,
        "moe": 4,
        "moe_tp": 1,
        "moe_ep": 4,
    }
    with pytest.raises(ValueError, match="does not divide"):
        ParallelConfig(world_size=4, attn_tp=3).sizes()
    with pytest.raises(ValueError, match="nest"):
        ParallelConfig(world_size=6, attn_tp=2, dense_tp=3).sizes()
