"""The MLA latent write as one op: ``torch.ops.tokenspeed.mla_latent_write`` and its Triton kernel.

CPU: the op against the normalisation and rotation written out in fp64, unused cache rows left
untouched (NaN), argument checks, opcheck, ``torch.compile(fullgraph=True)``; the Triton kernel
under the interpreter against the reference (tolerance table "elementwise") and bitwise against
the two kernels it replaces (Triton rms_norm + rotary, then index_copy). GPU (marker ``gpu``):
the same cases on the device, CUDA-graph replay equal to eager bitwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch

from tokenspeed_kernels import ops
from tokenspeed_kernels.reference.mla_latent import mla_latent_write_ref
from tokenspeed_kernels.testing import TOLERANCES, compare
from tokenspeed_kernels.testing.graphs import capture_graph
from tokenspeed_kernels.testing.interpreter import interpret_main, run_in_interpreter

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Case:
    tokens: int
    heads: int
    rank: int
    rope: int
    dtype: torch.dtype
    interleaved: bool
    page: int = 16
    factor: float = 1.0


CASES = {
    # DeepSeek-V3 / Moonlight dims: latent 512 + rope 64; 16 heads per rank at decode, 128 unsplit
    "deepseek_decode": Case(5, 16, 512, 64, BF16, True, page=64, factor=1.3),
    "deepseek_128_heads": Case(3, 128, 512, 64, BF16, True, page=64),
    "odd_f32": Case(7, 3, 24, 8, F32, False, factor=0.7),
    "f16_one_token": Case(1, 4, 96, 32, F16, True),
    "empty": Case(0, 16, 512, 64, BF16, True, page=64),
}


def make_inputs(case: Case, seed: int, device: str) -> dict[str, Any]:
    """The layouts the model hands over: latent = the kv_a columns of a wider projection, q_pe the
    rope columns of the query, q_pe_out the rope columns of the absorbed decode query; cache
    filled with NaN so a write to a wrong row or column shows."""
    gen = torch.Generator().manual_seed(seed)
    t, h, r, d, dt = case.tokens, case.heads, case.rank, case.rope, case.dtype
    proj = torch.randn(t, 40 + r + d, generator=gen).to(dt)
    q = torch.randn(t, h, 32 + d, generator=gen).to(dt)
    pages = max(2, (2 * t + case.page - 1) // case.page + 1)
    slots = torch.randperm(pages * case.page, generator=gen)[:t]
    out = {
        "positions": torch.randint(0, 100_000, (t,), generator=gen),
        "latent": proj[:, 40:],
        "weight": (1 + 0.1 * torch.randn(r, generator=gen)).to(dt),
        "q_pe": q[..., 32:],
        "inv_freq": 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)),
        "cache": torch.full((pages, case.page, r + d), float("nan"), dtype=dt),
        "slots": slots,
        "q_buf": torch.full((t, h, r + d), float("nan"), dtype=dt),
    }
    return {k: v.to(device) for k, v in out.items()}


def call(fn: Any, a: dict[str, Any], case: Case) -> None:
    fn(a["positions"], a["latent"], a["weight"], 1e-6, a["q_pe"], a["inv_freq"], case.factor, case.interleaved,
       a["cache"], a["slots"], a["q_buf"][..., case.rank:])  # fmt: skip


def unfused_triton(a: dict[str, Any], case: Case) -> None:
    """What the model ran before the fused op: Triton rms_norm and rotary, index_copy, copy."""
    from tokenspeed_kernels.triton.norm import rms_norm
    from tokenspeed_kernels.triton.rotary import rotary_embedding

    r = case.rank
    c = rms_norm(a["latent"][:, :r], a["weight"], 1e-6)
    q_rot, k_rot = rotary_embedding(a["positions"], a["q_pe"], a["latent"][:, r:].unsqueeze(1), a["inv_freq"],
                                    case.factor, case.interleaved)  # fmt: skip
    a["cache"].view(-1, a["cache"].shape[-1]).index_copy_(0, a["slots"], torch.cat([c, k_rot[:, 0]], -1))
    a["q_buf"][..., r:].copy_(q_rot)


def same_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    return bool(torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num()))


def run_case(case: Case, seed: int, device: str = "cpu") -> dict[str, Any]:
    from tokenspeed_kernels.triton.mla_latent import mla_latent_write

    got = make_inputs(case, seed, device)
    call(mla_latent_write, got, case)
    want = {k: v.cpu() for k, v in make_inputs(case, seed, "cpu").items()}
    call(mla_latent_write_ref, want, case)
    old = make_inputs(case, seed, device)
    unfused_triton(old, case)
    tol = TOLERANCES["elementwise"][case.dtype]
    flat_got, flat_want = got["cache"].cpu().flatten(0, 1), want["cache"].flatten(0, 1)
    rows = want["slots"]
    reports, ok = [], True
    for name, g, w in (("cache rows", flat_got[rows], flat_want[rows]), ("q_pe_out", got["q_buf"].cpu()[..., case.rank :],
                                                                         want["q_buf"][..., case.rank :])):  # fmt: skip
        c = compare(g.double(), w.double(), tol)
        ok = ok and c.ok
        reports.append(c.report(name))
    untouched = torch.ones(flat_got.shape[0], dtype=torch.bool)
    untouched[rows] = False
    ok = ok and bool(flat_got[untouched].isnan().all()) and bool(got["q_buf"].cpu()[..., : case.rank].isnan().all())
    equal_old = same_nan(got["cache"].cpu(), old["cache"].cpu()) and same_nan(got["q_buf"].cpu(), old["q_buf"].cpu())
    reports.append(f"bitwise equal to the unfused Triton kernels: {equal_old}")
    return {"ok": ok and equal_old, "report": f"seed={seed}: " + "; ".join(reports)}


# ------------------------------------------------------------------------------ CPU op


@pytest.mark.parametrize("interleaved", [False, True])
def test_cpu_op_matches_fp64_math(interleaved: bool, gen: torch.Generator) -> None:
    """fp32 op against the norm and the pairwise rotation in fp64 (from the same fp32 angles)."""
    case = Case(6, 3, 40, 16, F32, interleaved, page=8, factor=0.9)
    a = make_inputs(case, int(torch.randint(0, 2**31, (1,), generator=gen)), "cpu")
    call(ops.mla_latent_write, a, case)
    r, d = case.rank, case.rope
    lat = a["latent"].double()
    c = lat[:, :r] / (lat[:, :r].pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * a["weight"].double()
    ang = (a["positions"].float()[:, None] * a["inv_freq"]).double()

    def rot(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1) * 0.9

    flat = a["cache"].flatten(0, 1)
    tol = TOLERANCES["attention"][F32]  # fp32 rounding of the norm, cos, sin and four ops
    for name, got, want in (("c", flat[a["slots"], :r], c), ("k_pe", flat[a["slots"], r:], rot(lat[:, r:], ang)),
                            ("q_pe", a["q_buf"][..., r:], rot(a["q_pe"].double(), ang[:, None, :]))):  # fmt: skip
        cmp = compare(got.double(), want, tol)
        assert cmp.ok, cmp.report(name)
    others = torch.ones(flat.shape[0], dtype=torch.bool)
    others[a["slots"]] = False
    assert flat[others].isnan().all(), "a cache row that no token owns was written"
    assert a["q_buf"][..., :r].isnan().all(), "q_pe_out's neighbours were written"


BAD = [
    ({"cache_dtype": torch.float8_e4m3fn}, r"cache must have latent's dtype .* kv_cache_write"),
    ({"rope": 7}, r"must be norm_weight's rank .* even rope"),
    ({"slots_dtype": torch.int32}, r"slots must be int64 \[tokens=4\]"),
    ({"positions_dtype": torch.float32}, r"positions must be int64/int32"),
    ({"q_heads_out": 3}, r"q_pe_out must have q_pe's shape"),
    ({"q_dtype": F32}, r"q_pe must have latent's dtype"),
    ({"cache_width": 70}, r"cache must be \[pages, page_size, rank \+ rope = 72\]"),
    ({"transpose_q": True}, r"q_pe must be contiguous in its last dimension"),
    ({"inv_len": 3}, r"inv_freq must be floating \[rope / 2 = 4\]"),
]


@pytest.mark.parametrize("change,pattern", BAD)
def test_bad_inputs_name_the_argument(change: dict[str, Any], pattern: str) -> None:
    t, h, r, d = 4, 2, 64, change.get("rope", 8)
    lat = torch.randn(t, r + d).bfloat16()
    q = torch.randn(t, h, 8).to(change.get("q_dtype", BF16))
    if change.get("transpose_q"):
        q = torch.randn(t, 8, h).bfloat16().transpose(1, 2)
    out = torch.empty(t, change.get("q_heads_out", h), 8).bfloat16()
    cache = torch.zeros(2, 16, change.get("cache_width", r + d)).to(change.get("cache_dtype", BF16))
    pos = torch.arange(t).to(change.get("positions_dtype", torch.int64))
    slots = torch.arange(t).to(change.get("slots_dtype", torch.int64))
    inv = torch.ones(change.get("inv_len", d // 2))
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        ops.mla_latent_write(pos, lat, torch.ones(r).bfloat16(), 1e-6, q, inv, 1.0, True, cache, slots, out)


def test_opcheck_and_compile(gen: torch.Generator) -> None:
    case = CASES["odd_f32"]
    a = make_inputs(case, int(torch.randint(0, 2**31, (1,), generator=gen)), "cpu")
    a["cache"].zero_()  # opcheck compares outputs with NaN-unaware equality
    a["q_buf"].zero_()
    args = (a["positions"], a["latent"], a["weight"], 1e-6, a["q_pe"], a["inv_freq"], 0.7, False, a["cache"],
            a["slots"], a["q_buf"][..., case.rank :])  # fmt: skip
    torch.library.opcheck(torch.ops.tokenspeed.mla_latent_write.default, args)

    def f(cache: torch.Tensor, q_buf: torch.Tensor) -> torch.Tensor:
        ops.mla_latent_write(*args[:8], cache, a["slots"], q_buf[..., case.rank :])
        return cache.sum() + q_buf.sum()

    c1, q1 = a["cache"].clone(), a["q_buf"].clone()
    c2, q2 = a["cache"].clone(), a["q_buf"].clone()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(c1, q1), f(c2, q2))
    assert torch.equal(c1, c2) and torch.equal(q1, q2)


# ------------------------------------------------------------------------ Triton, interpreter


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, Any]]:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case_id", list(CASES))
def test_triton_interpreter_matches_reference(case_id: str, interpreter_results: dict[str, dict[str, Any]]) -> None:
    result = interpreter_results[case_id]
    assert result["ok"], result["report"]


# ----------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", list(CASES))
def test_gpu_matches_reference(case_id: str, gen: torch.Generator) -> None:
    result = run_case(CASES[case_id], int(torch.randint(0, 2**31, (1,), generator=gen)), "cuda")
    assert result["ok"], result["report"]


@pytest.mark.gpu
def test_gpu_op_graph_replay_equals_eager(gen: torch.Generator) -> None:
    case = CASES["deepseek_decode"]
    a = make_inputs(case, 3, "cuda")

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        call(ops.mla_latent_write, a, case)
        return a["cache"], a["q_buf"]

    graph, _ = capture_graph(step)
    a["positions"].copy_(torch.randint(0, 100_000, a["positions"].shape, generator=gen))
    a["latent"].copy_(torch.randn(a["latent"].shape, generator=gen).to(case.dtype))
    graph.replay()
    torch.cuda.synchronize()
    replayed = (a["cache"].clone(), a["q_buf"].clone())
    step()
    assert same_nan(replayed[0], a["cache"]) and same_nan(replayed[1], a["q_buf"])


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    interpret_main({cid: partial(run_case, case) for cid, case in CASES.items()}, int(sys.argv[2]))
