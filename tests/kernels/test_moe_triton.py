"""The Triton MoE backends (moe_route, moe_align, fused_moe) against the references.

CPU: the kernels run under the Triton interpreter in one subprocess (TRITON_INTERPRET must be
set before Triton decorates the kernels). The interpreter's casts to bf16 and fp8 truncate,
so there the kernels round on the fp32 grid first (exactly what the GPU's RNE casts do), and
its tl.dot gets exact fp32 upcasts; the tensor-core paths are covered on the GPU.
moe_align is torch ops and is checked in-process. GPU (``-m gpu``): DeepSeek-V3 shapes.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any

import pytest
import torch

from tokenspeed_kernels.reference import fused_moe_by_expert_ref, fused_moe_ref, moe_route_ref
from tokenspeed_kernels.testing import TOLERANCES, assert_close, compare
from tokenspeed_kernels.testing.graphs import capture_graph
from tokenspeed_kernels.testing.interpreter import interpret_main, run_in_interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# id: (tokens, experts, top_k, scoring, bias, n_group, topk_group, renormalize, logits kind, logits dtype)
ROUTE_CASES: dict[str, tuple[Any, ...]] = {
    "deepseek-256-g8-top8": (19, 256, 8, "sigmoid", True, 8, 4, True, "randn", "float32"),
    "sigmoid-groups-no-bias": (7, 64, 6, "sigmoid", False, 8, 3, True, "randn", "float32"),
    "softmax-top4-no-renorm": (11, 16, 4, "softmax", False, 1, 1, False, "randn", "float32"),
    "softmax-bf16-logits": (5, 64, 6, "softmax", False, 1, 1, True, "randn", "bfloat16"),
    "ties-grouped": (13, 32, 6, "sigmoid", True, 4, 2, True, "ties", "float32"),
    "ties-softmax": (9, 24, 5, "softmax", False, 1, 1, True, "ties", "float32"),
    "non-pow2-experts": (6, 24, 5, "sigmoid", True, 3, 2, True, "randn", "float32"),
    "top_k-beyond-kept-groups": (3, 8, 6, "sigmoid", True, 4, 1, True, "randn", "float32"),
}

# id: (dtype, tokens, local experts, global experts, expert_offset, top_k, hidden, intermediate, ids kind, block_m)
MOE_CASES: dict[str, tuple[Any, ...]] = {
    "bf16-random": ("bfloat16", 13, 8, 8, 0, 3, 64, 48, "route", None),
    "fp16-random": ("float16", 9, 6, 6, 0, 2, 96, 80, "route", None),
    "bf16-skewed": ("bfloat16", 20, 6, 6, 0, 2, 64, 32, "skewed", None),
    "bf16-all-on-one-expert": ("bfloat16", 40, 4, 4, 0, 1, 32, 32, "one", None),
    "bf16-ep-offset": ("bfloat16", 11, 4, 12, 4, 3, 64, 32, "route", None),
    "bf16-tile64-config": ("bfloat16", 30, 3, 3, 0, 2, 64, 64, "route", 64),
    "fp8-block-scaled": ("float8_e4m3fn", 7, 4, 4, 0, 2, 256, 128, "route", None),
    "fp8-ep-skewed": ("float8_e4m3fn", 9, 2, 4, 2, 2, 256, 256, "skewed", None),
}


def make_logits(case: tuple[Any, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    tokens, experts, _, _, bias, _, _, _, kind, dtype = case
    if kind == "ties":  # few distinct values: many equal scores, equal group scores, all-equal rows
        logits = torch.randint(0, 3, (tokens, experts), generator=gen).float() / 2
        logits[0] = 0.0
        b = torch.zeros(experts) if bias else None
    else:
        logits = torch.randn(tokens, experts, generator=gen)
        b = torch.rand(experts, generator=gen) * 0.1 if bias else None
    return logits.to(getattr(torch, dtype)), b


def run_route_case(case: tuple[Any, ...], seed: int, device: str = "cpu") -> dict[str, Any]:
    from tokenspeed_kernels.triton.moe_route import moe_route

    gen = torch.Generator().manual_seed(seed)
    logits, bias = make_logits(case, gen)
    _, _, top_k, scoring, _, n_group, topk_group, renorm, _, _ = case
    args = (top_k, scoring, bias, n_group, topk_group, renorm, 2.5)
    w, ids = moe_route(logits.to(device), *args[:2], None if bias is None else bias.to(device), *args[3:])
    rw, rids = moe_route_ref(logits, *args)
    c = compare(w, rw, TOLERANCES["routing_weights"][torch.float32])
    same = torch.equal(ids.cpu(), rids)
    ok = same and c.ok and ids.dtype == torch.int32 and w.dtype == torch.float32
    return {"ok": ok, "report": f"seed={seed} ids equal: {same}; " + c.report("weights")}


def make_moe_inputs(case: tuple[Any, ...], gen: torch.Generator, device: str = "cpu") -> dict[str, Any]:
    dtype_name, tokens, local, total, offset, top_k, hidden, inter, kind, _ = case
    fp8 = dtype_name == "float8_e4m3fn"
    act_dtype = torch.bfloat16 if fp8 else getattr(torch, dtype_name)
    x = torch.randn(tokens, hidden, generator=gen).to(act_dtype)
    w13 = torch.randn(local, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(local, hidden, inter, generator=gen) * inter**-0.5
    if kind == "route":
        w, ids = moe_route_ref(torch.randn(tokens, total, generator=gen), top_k, "softmax")
        ids[0] = ids[0, 0]  # one token routed to the same expert in every slot
        if offset:
            ids[-1] = (offset + local) % total  # a token none of whose experts live on this rank
    else:
        w = torch.rand(tokens, top_k, generator=gen)
        ids = torch.full((tokens, top_k), offset, dtype=torch.int32)  # every token on the first local expert
        if kind == "skewed":
            ids[:, 1] = offset + local - 1
            off_rank = (offset + local) % total  # another rank's expert when offset > 0
            ids[4, 1] = offset + 1 if local > 2 else off_rank  # expert 1 gets one token; or an off-rank slot
            ids[5, 0] = off_rank
    s13 = s2 = None
    if fp8:
        s13 = torch.rand(local, -(-2 * inter // 128), -(-hidden // 128), generator=gen) * 0.01 + 0.002
        s2 = torch.rand(local, -(-hidden // 128), -(-inter // 128), generator=gen) * 0.01 + 0.002
        w13 = (w13 / s13.repeat_interleave(128, 1).repeat_interleave(128, 2)).to(torch.float8_e4m3fn)
        w2 = (w2 / s2.repeat_interleave(128, 1).repeat_interleave(128, 2)).to(torch.float8_e4m3fn)
    else:
        w13, w2 = w13.to(act_dtype), w2.to(act_dtype)
    args = [x, w13, w2, w.float(), ids.to(torch.int32), s13, s2]
    return {"args": [a.to(device) if a is not None else None for a in args], "offset": offset, "fp8": fp8}


def moe_reference(inp: dict[str, Any]) -> torch.Tensor:
    x, w13, w2, w, ids, s13, s2 = (a.cpu() if a is not None else None for a in inp["args"])
    if inp["fp8"]:  # the contract itself: fp32 math, intermediate stored in bf16, fp8 round trips
        return fused_moe_ref(x, w13, w2, w, ids, s13, s2, inp["offset"])
    return fused_moe_ref(x.double(), w13.double(), w2.double(), w, ids, None, None, inp["offset"])


def run_moe_case(case: tuple[Any, ...], seed: int, device: str = "cpu") -> dict[str, Any]:
    from tokenspeed_kernels.triton.fused_moe import fused_moe_with_config
    from tokenspeed_kernels.triton.moe_configs import MoeGemmConfig

    gen = torch.Generator().manual_seed(seed)
    inp = make_moe_inputs(case, gen, device)
    bm = case[-1]
    configs = (MoeGemmConfig(bm, 32, 32, 2, 4, 2), MoeGemmConfig(bm, 32, 32, 2, 4, 2)) if bm else None
    out = fused_moe_with_config(*inp["args"], inp["offset"], configs=configs)
    dtype = getattr(torch, case[0])
    c = compare(out, moe_reference(inp), TOLERANCES["moe"][dtype])
    return {"ok": c.ok and out.dtype == inp["args"][0].dtype, "report": f"seed={seed}: " + c.report("out")}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, Any]]:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case_id", [f"route/{k}" for k in ROUTE_CASES] + [f"moe/{k}" for k in MOE_CASES])
def test_interpreter_matches_reference(case_id: str, interpreter_results: dict[str, dict[str, Any]]) -> None:
    result = interpreter_results[case_id]
    assert result["ok"], result["report"]


ALIGN_CASES = [(13, 3, 8, 0, 16), (40, 1, 4, 0, 16), (9, 8, 32, 16, 4), (1, 8, 256, 0, 16), (0, 8, 4, 0, 16)]


@pytest.mark.parametrize("tokens,top_k,experts,offset,block_m", ALIGN_CASES)
def test_moe_align_permutation(tokens: int, top_k: int, experts: int, offset: int, block_m: int, gen: torch.Generator) -> None:
    from tokenspeed_kernels.triton.moe_align import max_tiles, moe_align

    ids = torch.randint(0, 2 * experts if offset else experts, (tokens, top_k), generator=gen, dtype=torch.int32)
    if tokens > 2:
        ids[:2] = offset  # a crowded expert
    al = moe_align(ids, experts, block_m, offset)
    slots = tokens * top_k
    assert al.num_tiles == max_tiles(slots, experts, block_m)
    local = ids.flatten().long() - offset
    counts = torch.bincount(local[(local >= 0) & (local < experts)], minlength=experts)
    padded = int(al.padded_rows)
    assert padded == int(((counts + block_m - 1) // block_m * block_m).sum()) <= al.num_tiles * block_m
    tiles = al.sorted_slots.view(al.num_tiles, block_m)
    seen: list[int] = []
    for t in range(al.num_tiles):
        e, row = int(al.tile_expert[t]), tiles[t]
        real = row[row < slots]
        if t * block_m >= padded:  # unused tile: its GEMM programs exit
            assert e == -1 and real.numel() == 0
            continue
        assert e >= 0 and real.numel() > 0
        assert (local[real.long()] == e).all(), f"tile {t} holds another expert's slots"
        assert (real.diff() > 0).all() and (row[: real.numel()] == real).all()  # token order, padding last
        seen += real.tolist()
    expect = torch.nonzero((local >= 0) & (local < experts)).flatten().tolist()
    assert sorted(seen) == expect  # every local slot exactly once, other ranks' slots nowhere


def test_registration() -> None:
    from tokenspeed_kernels import registry
    from tokenspeed_kernels.registry import A100, CPU, H100

    for op, dtype in (("moe_route", torch.float32), ("fused_moe", torch.bfloat16), ("fused_moe", torch.float16)):
        with registry.use_backend("triton", op):
            for dev in (H100, A100):
                k = registry.select(op, dev, dtype)
                assert k.backend == "triton" and k.impl == f"tokenspeed_kernels.triton.{op}:{op}"
            with pytest.raises(registry.NoKernelError):
                registry.select(op, CPU, dtype)
    with registry.use_backend("triton", "fused_moe"), pytest.raises(registry.NoKernelError):
        registry.select("fused_moe", H100, torch.float32)


# ----------------------------------------------------------------------------------- GPU
DS_HIDDEN, DS_EXPERTS, DS_TOP_K, DS_LOCAL = 7168, 256, 8, 64


def _ds_route(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenspeed_kernels.triton.moe_route import moe_route

    logits = torch.randn(tokens, DS_EXPERTS, generator=gen).cuda()
    bias = (torch.rand(DS_EXPERTS, generator=gen) * 0.1).cuda()
    return moe_route(logits, DS_TOP_K, "sigmoid", bias, 8, 4, True, 2.5)


def _ds_experts(inter: int, fp8: bool, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    w13 = torch.randn(DS_LOCAL, 2 * inter, DS_HIDDEN, generator=gen).cuda() * DS_HIDDEN**-0.5
    w2 = torch.randn(DS_LOCAL, DS_HIDDEN, inter, generator=gen).cuda() * inter**-0.5
    if not fp8:
        return w13.bfloat16(), w2.bfloat16(), None, None
    s13 = (torch.rand(DS_LOCAL, 2 * inter // 128, DS_HIDDEN // 128, generator=gen) * 0.01 + 0.002).cuda()
    s2 = (torch.rand(DS_LOCAL, DS_HIDDEN // 128, inter // 128, generator=gen) * 0.01 + 0.002).cuda()
    q13 = (w13 / s13.repeat_interleave(128, 1).repeat_interleave(128, 2)).to(torch.float8_e4m3fn)
    q2 = (w2 / s2.repeat_interleave(128, 1).repeat_interleave(128, 2)).to(torch.float8_e4m3fn)
    return q13, q2, s13, s2


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", list(ROUTE_CASES))
def test_gpu_route_matches_reference(case_id: str, gen: torch.Generator) -> None:
    result = run_route_case(ROUTE_CASES[case_id], int(torch.randint(0, 2**31, (1,), generator=gen)), "cuda")
    assert result["ok"], result["report"]


@pytest.mark.gpu
def test_gpu_route_deepseek_many_tokens(gen: torch.Generator) -> None:
    """4096 tokens: ids equal the reference's except where the two choices' scores tie within
    fp32 rounding (tl.exp and torch's sigmoid may differ by an ulp); at most a handful."""
    logits = torch.randn(4096, DS_EXPERTS, generator=gen).cuda()
    bias = (torch.rand(DS_EXPERTS, generator=gen) * 0.1).cuda()
    from tokenspeed_kernels.triton.moe_route import moe_route

    w, ids = moe_route(logits, DS_TOP_K, "sigmoid", bias, 8, 4, True, 2.5)
    rw, rids = moe_route_ref(logits, DS_TOP_K, "sigmoid", bias, 8, 4, True, 2.5)
    bad = (ids != rids).any(-1)
    choice = logits.sigmoid() + bias
    gap = (choice.gather(1, ids.long()).sort(-1).values - choice.gather(1, rids.long()).sort(-1).values).abs().amax(-1)
    assert int(bad.sum()) <= 4 and bool((gap[bad] < 1e-6).all()), f"{int(bad.sum())} rows differ, gaps {gap[bad]}"
    assert_close(w[~bad], rw[~bad], "routing_weights", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("inter", [2048, 512])
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_deepseek_shapes(tokens: int, inter: int, fp8: bool, gen: torch.Generator) -> None:
    from tokenspeed_kernels.triton.fused_moe import fused_moe

    w, ids = _ds_route(tokens, gen)
    x = torch.randn(tokens, DS_HIDDEN, generator=gen).bfloat16().cuda()
    w13, w2, s13, s2 = _ds_experts(inter, fp8, gen)
    for offset in (0, 64):  # two EP ranks of 64 local experts
        out = fused_moe(x, w13, w2, w, ids, s13, s2, offset)
        if fp8:
            ref = fused_moe_by_expert_ref(x, w13, w2, w, ids, s13, s2, offset)
            assert_close(out, ref, "moe", torch.float8_e4m3fn, f"offset {offset}")
        else:
            ref = fused_moe_by_expert_ref(x.double(), w13, w2, w, ids, None, None, offset)
            assert_close(out, ref, "moe", torch.bfloat16, f"offset {offset}")


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_cuda_graph_replay_equals_eager_bitwise(fp8: bool, gen: torch.Generator) -> None:
    """Routing and experts captured together; new logits and activations before the replay."""
    from tokenspeed_kernels.triton.fused_moe import fused_moe
    from tokenspeed_kernels.triton.moe_route import moe_route

    w13, w2, s13, s2 = _ds_experts(512, fp8, gen)
    logits = torch.randn(8, DS_EXPERTS, generator=gen).cuda()
    bias = (torch.rand(DS_EXPERTS, generator=gen) * 0.1).cuda()
    x = torch.randn(8, DS_HIDDEN, generator=gen).bfloat16().cuda()

    def step() -> torch.Tensor:
        w, ids = moe_route(logits, DS_TOP_K, "sigmoid", bias, 8, 4, True, 2.5)
        return fused_moe(x, w13, w2, w, ids, s13, s2, 0)

    before = step()
    graph, captured = capture_graph(step)
    logits.copy_(torch.randn(8, DS_EXPERTS, generator=gen))
    x.copy_(torch.randn(8, DS_HIDDEN, generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, step()) and not torch.equal(captured, before)


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    interpret_main(
        {
            **{f"route/{k}": partial(run_route_case, c) for k, c in ROUTE_CASES.items()},
            **{f"moe/{k}": partial(run_moe_case, c) for k, c in MOE_CASES.items()},
        },
        int(sys.argv[2]),
    )
