"""Rotary position embedding as one op: ``torch.ops.tokenspeed.rotary_embedding`` and its Triton
kernel on CUDA.

CPU: the op against fp64 math and its argument checks, opcheck, ``torch.compile(fullgraph=True)``
(the models' logits against Hugging Face, in tests/models, run through it too); the Triton kernel
under the interpreter against the reference (tolerance table "elementwise"). GPU (marker
``gpu``): the same cases on the device, CUDA-graph replay equal to eager bitwise.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch

from tokenspeed_kernels import ops
from tokenspeed_kernels.reference.rotary import rotary_embedding_ref
from tokenspeed_kernels.testing import TOLERANCES, compare
from tokenspeed_kernels.testing.graphs import capture_graph
from tokenspeed_kernels.testing.interpreter import interpret_main, run_in_interpreter

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Case:
    tokens: int
    q_heads: int
    k_heads: int
    dim: int
    dtype: torch.dtype
    interleaved: bool
    deepseek_slices: bool = False  # q_pe / k_pe as slices of the wider projections, as the model has them
    max_position: int = 4096
    factor: float = 1.0


CASES = {
    "deepseek_q16": Case(9, 16, 1, 64, BF16, True, deepseek_slices=True, max_position=163840, factor=1.3),
    "deepseek_q128": Case(3, 128, 1, 64, BF16, True, deepseek_slices=True),
    "llama_gqa": Case(7, 4, 2, 64, BF16, False),
    "llama_f16": Case(5, 8, 8, 128, F16, False),
    "odd_f32": Case(4, 3, 1, 24, F32, True, factor=0.7),
    "empty": Case(0, 16, 1, 64, BF16, True),
}


def make_inputs(case: Case, seed: int, device: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    t, d = case.tokens, case.dim
    if case.deepseek_slices:
        q = torch.randn(t, case.q_heads, 128 + d, generator=gen).to(case.dtype).to(device)[..., 128:]
        k = torch.randn(t, 512 + d, generator=gen).to(case.dtype).to(device)[:, 512:].unsqueeze(1)
    else:
        q = torch.randn(t, case.q_heads, d, generator=gen).to(case.dtype).to(device)
        k = torch.randn(t, case.k_heads, d, generator=gen).to(case.dtype).to(device)
    positions = torch.randint(0, case.max_position, (t,), generator=gen).to(device)
    inv_freq = (1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(device)
    return {"positions": positions, "q": q, "k": k, "inv_freq": inv_freq, "factor": case.factor}


def run_case(case: Case, seed: int, device: str = "cpu") -> dict[str, Any]:
    from tokenspeed_kernels.triton.rotary import rotary_embedding

    a = make_inputs(case, seed, device)
    got = rotary_embedding(a["positions"], a["q"], a["k"], a["inv_freq"], a["factor"], case.interleaved)
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    want = rotary_embedding_ref(cpu["positions"], cpu["q"], cpu["k"], cpu["inv_freq"], cpu["factor"], case.interleaved)
    reports, ok = [], True
    for name, g, w in (("q", got[0], want[0]), ("k", got[1], want[1])):
        c = compare(g.cpu().double(), w.double(), TOLERANCES["elementwise"][case.dtype])
        ok = ok and c.ok and g.is_contiguous() and g.shape == w.shape
        reports.append(c.report(name))
    return {"ok": ok, "report": f"seed={seed}: " + "; ".join(reports)}


# ------------------------------------------------------------------------------ CPU op


@pytest.mark.parametrize("interleaved", [False, True])
def test_cpu_op_matches_fp64_rotation(interleaved: bool, gen: torch.Generator) -> None:
    """fp32 op against the rotation written out in fp64, pair by pair, from the same fp32 angles
    (an fp32 angle of position 50K is off by up to 2e-3 rad from the exact one: HF has that too)."""
    t, h, d = 6, 3, 32
    q, k = torch.randn(t, h, d, generator=gen), torch.randn(t, 1, d, generator=gen)
    pos = torch.randint(0, 50_000, (t,), generator=gen)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    got_q, got_k = ops.rotary_embedding(pos, q, k, inv.float(), 0.9, interleaved)
    for x, got in ((q, got_q), (k, got_k)):
        x = x.double()
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
        ang = (pos.float()[:, None] * inv.float()).double()[:, None, :]  # the contract: fp32 angles (as HF)
        want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1) * 0.9
        c = compare(got.double(), want, TOLERANCES["attention"][F32])  # fp32 rounding of cos, sin and 4 ops
        assert c.ok, c.report("rotary vs fp64")
    assert math.isclose(float(got_q.norm()), 0.9 * float(q.norm()), rel_tol=1e-4)  # a rotation keeps norms


BAD = [
    ({"k_dtype": F32}, r"k must have q's dtype"),
    ({"dim": 63}, r"rot_dim .* must be even"),
    ({"positions_dtype": torch.float32}, r"positions must be int64/int32"),
    ({"inv_len": 5}, r"inv_freq must be floating \[rot_dim / 2 = 32\]"),
    ({"k_tokens": 3}, r"k must be \[tokens=4"),
    ({"transpose": True}, r"q must be contiguous in its last dimension"),
]


@pytest.mark.parametrize("change,pattern", BAD)
def test_bad_inputs_name_the_argument(change: dict[str, Any], pattern: str) -> None:
    d = change.get("dim", 64)
    q = torch.randn(4, 2, d).bfloat16()
    if change.get("transpose"):
        q = torch.randn(4, d, 2).bfloat16().transpose(1, 2)
    k = torch.randn(change.get("k_tokens", 4), 1, d).to(change.get("k_dtype", BF16))
    pos = torch.arange(4).to(change.get("positions_dtype", torch.int64))
    inv = torch.ones(change.get("inv_len", d // 2))
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        ops.rotary_embedding(pos, q, k, inv, 1.0, True)


def test_opcheck_and_compile(gen: torch.Generator) -> None:
    q = torch.randn(5, 4, 64, generator=gen).bfloat16()
    k = torch.randn(5, 1, 64, generator=gen).bfloat16()
    pos = torch.randint(0, 1000, (5,), generator=gen)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.library.opcheck(torch.ops.tokenspeed.rotary_embedding.default, (pos, q, k, inv, 1.2, True))

    def f(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        a, b = ops.rotary_embedding(pos, q, k, inv, 1.2, True)
        return a.float().sum(-1) + b.float().sum(-1)

    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k), f(q, k))


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
    a = make_inputs(CASES["deepseek_q16"], 3, "cuda")

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rotary_embedding(a["positions"], a["q"], a["k"], a["inv_freq"], a["factor"], True)

    graph, captured = capture_graph(step)
    a["positions"].copy_(torch.randint(0, 100_000, a["positions"].shape, generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, step(), strict=True):
        assert torch.equal(x, y)


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    interpret_main({cid: partial(run_case, case) for cid, case in CASES.items()}, int(sys.argv[2]))
