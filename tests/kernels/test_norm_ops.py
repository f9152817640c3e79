"""RMSNorm, fused residual-add RMSNorm and SiLU-and-mul: ``torch.ops.tokenspeed.*`` and the Triton
kernels behind them on CUDA.

CPU: the op (the torch reference) equals Hugging Face's RMSNorm bit for bit, argument checks
name the argument, opcheck and ``torch.compile(fullgraph=True)``; the Triton kernels under the
interpreter against the reference (tolerance table "elementwise"; the residual output exactly).
GPU (marker ``gpu``): the same cases on the device, CUDA-graph replay equal to eager bitwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch

from tokenspeed_kernels import ops
from tokenspeed_kernels.reference.norm import fused_add_rms_norm_ref, rms_norm_ref, silu_and_mul_ref
from tokenspeed_kernels.testing import TOLERANCES, compare
from tokenspeed_kernels.testing.graphs import capture_graph
from tokenspeed_kernels.testing.interpreter import interpret_main, run_in_interpreter

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Case:
    op: str  # rms_norm / fused_add_rms_norm / silu_and_mul
    shape: tuple[int, ...]  # of x
    dtype: torch.dtype
    row_stride: int | None = None  # x as a column slice of a wider [rows, row_stride] tensor


CASES = {
    "norm_bf16_moonlight": Case("rms_norm", (7, 2048), BF16),
    "norm_bf16_kv_a_slice": Case("rms_norm", (5, 512), BF16, row_stride=576),  # kv_a_layernorm on a split
    "norm_f32_deepseek": Case("rms_norm", (3, 7168), F32),
    "norm_f16_3d": Case("rms_norm", (2, 3, 1536), F16),
    "norm_bf16_odd_hidden": Case("rms_norm", (4, 100), BF16),
    "norm_empty": Case("rms_norm", (0, 64), BF16),
    "fused_bf16_moonlight": Case("fused_add_rms_norm", (9, 2048), BF16),
    "fused_f32_odd": Case("fused_add_rms_norm", (2, 3, 72), F32),
    "silu_bf16_moonlight_moe": Case("silu_and_mul", (6, 2 * 1408), BF16),
    "silu_bf16_dense": Case("silu_and_mul", (3, 2 * 11264), BF16),
    "silu_f32_odd": Case("silu_and_mul", (2, 5, 2 * 37), F32),
    "silu_empty": Case("silu_and_mul", (0, 2 * 64), BF16),
}


def make_inputs(case: Case, seed: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = case.shape
    if case.row_stride is not None:
        wide = torch.randn(shape[0], case.row_stride, generator=gen) * 3
        x = wide.to(case.dtype).to(device)[:, : shape[1]]
    else:
        x = (torch.randn(*shape, generator=gen) * 3).to(case.dtype).to(device)
    out = {"x": x}
    if case.op != "silu_and_mul":
        out["weight"] = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(case.dtype).to(device)
    if case.op == "fused_add_rms_norm":
        out["residual"] = torch.randn(*shape, generator=gen).to(case.dtype).to(device)
    return out


def expected(case: Case, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    cpu = {k: v.cpu() for k, v in t.items()}
    if case.op == "rms_norm":
        return (rms_norm_ref(cpu["x"], cpu["weight"], 1e-6),)
    if case.op == "fused_add_rms_norm":
        return fused_add_rms_norm_ref(cpu["x"], cpu["residual"], cpu["weight"], 1e-6)
    return (silu_and_mul_ref(cpu["x"]),)


def run_triton(case: Case, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    from tokenspeed_kernels.triton import norm

    if case.op == "rms_norm":
        return (norm.rms_norm(t["x"], t["weight"], 1e-6),)
    if case.op == "fused_add_rms_norm":
        return norm.fused_add_rms_norm(t["x"], t["residual"], t["weight"], 1e-6)
    return (norm.silu_and_mul(t["x"]),)


def check_case(case: Case, got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], seed: int) -> dict[str, Any]:
    c = compare(got[0].cpu().double(), want[0].double(), TOLERANCES["elementwise"][case.dtype])
    ok, report = c.ok, f"seed={seed}: {c.report(case.op)}"
    if got[0].shape != want[0].shape or not got[0].is_contiguous():
        ok, report = False, f"seed={seed}: shape {tuple(got[0].shape)} / contiguous {got[0].is_contiguous()}"
    if len(want) == 2 and not torch.equal(got[1].cpu(), want[1]):
        ok, report = False, f"seed={seed}: the residual sum differs from x + residual in {case.dtype}"
    return {"ok": ok, "report": report}


def run_case(case: Case, seed: int, device: str = "cpu") -> dict[str, Any]:
    t = make_inputs(case, seed, device)
    return check_case(case, run_triton(case, t), expected(case, t), seed)


# ------------------------------------------------------------------------------ CPU op


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_reference_equals_hugging_face_rmsnorm_bitwise(dtype: torch.dtype, gen: torch.Generator) -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    hf = DeepseekV3RMSNorm(2048, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(2048, generator=gen))
    x = (torch.randn(5, 2048, generator=gen) * 3).to(dtype)
    assert torch.equal(ops.rms_norm(x, hf.weight.detach(), 1e-6), hf(x).detach())


def test_engine_norm_and_activation_equal_the_ops_bitwise(gen: torch.Generator) -> None:
    """The engine's layers compute exactly what the ops do, so switching them over changes nothing on CPU."""
    from tokenspeed_engine.layers.activation import silu_and_mul
    from tokenspeed_engine.layers.norm import rms_norm

    x = (torch.randn(4, 1536, generator=gen) * 2).bfloat16()
    w = (1 + 0.1 * torch.randn(1536, generator=gen)).bfloat16()
    assert torch.equal(rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))
    assert torch.equal(silu_and_mul(x), ops.silu_and_mul(x))


@pytest.mark.parametrize("case_id", ["fused_f32_odd", "norm_bf16_kv_a_slice", "silu_f32_odd"])
def test_cpu_op_matches_fp64_math(case_id: str) -> None:
    case = CASES[case_id]
    t = make_inputs(case, 5, "cpu")
    t64 = {k: v.double() for k, v in t.items()}
    if case.op == "silu_and_mul":
        got, want = ops.silu_and_mul(t["x"]), silu_and_mul_ref(t64["x"])
    elif case.op == "rms_norm":
        got, want = ops.rms_norm(t["x"], t["weight"], 1e-6), rms_norm_ref(t64["x"], t64["weight"], 1e-6)
    else:
        got, want = ops.fused_add_rms_norm(t["x"], t["residual"], t["weight"], 1e-6)[0], fused_add_rms_norm_ref(
            t64["x"], t64["residual"], t64["weight"], 1e-6
        )[0]
    c = compare(got.double(), want, TOLERANCES["elementwise"][case.dtype])
    assert c.ok, c.report(case_id)


BAD = [
    ("rms_norm", {"weight_dtype": F32}, r"weight must have x's dtype"),
    ("rms_norm", {"weight_len": 63}, r"weight must be \[64\]"),
    ("rms_norm", {"x_dtype": torch.int32}, r"x must be one of"),
    ("rms_norm", {"eps": -1.0}, r"eps must be a finite number"),
    ("rms_norm", {"transpose": True}, r"x must be contiguous in its last dimension"),
    ("fused_add_rms_norm", {"residual_shape": (3, 32)}, r"residual must have x's shape"),
    ("fused_add_rms_norm", {"residual_dtype": F32}, r"residual must have x's dtype"),
    ("silu_and_mul", {"x_len": 63}, r"x must be \[\.\.\., 2 \* N\]"),
]


@pytest.mark.parametrize("op,change,pattern", BAD)
def test_bad_inputs_name_the_argument(op: str, change: dict[str, Any], pattern: str) -> None:
    n = change.get("x_len", 64)
    x = torch.randn(3, n).to(change.get("x_dtype", BF16)) if "x_dtype" not in change else torch.ones(3, n, dtype=torch.int32)
    if change.get("transpose"):
        x = torch.randn(n, 3).bfloat16().t()
    w = torch.ones(change.get("weight_len", n), dtype=change.get("weight_dtype", BF16))
    r = torch.zeros(change.get("residual_shape", x.shape), dtype=change.get("residual_dtype", BF16))
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        if op == "rms_norm":
            ops.rms_norm(x, w, change.get("eps", 1e-6))
        elif op == "fused_add_rms_norm":
            ops.fused_add_rms_norm(x, r, w, 1e-6)
        else:
            ops.silu_and_mul(x)


def test_opcheck_and_compile(gen: torch.Generator) -> None:
    x = torch.randn(4, 96, generator=gen).bfloat16()
    r = torch.randn(4, 96, generator=gen).bfloat16()
    w = (1 + 0.1 * torch.randn(96, generator=gen)).bfloat16()
    torch.library.opcheck(torch.ops.tokenspeed.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.tokenspeed.fused_add_rms_norm.default, (x, r, w, 1e-6))
    torch.library.opcheck(torch.ops.tokenspeed.silu_and_mul.default, (x,))

    def layer(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        h, s = ops.fused_add_rms_norm(x, r, w, 1e-6)
        return ops.silu_and_mul(ops.rms_norm(h, w, 1e-6)) + s[:, :48]

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, r), layer(x, r))


def test_registry_selects_triton_on_nvidia_and_the_reference_on_cpu() -> None:
    from tokenspeed_kernels import registry

    h100 = registry.DeviceInfo("nvidia", (9, 0), "cuda")
    for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul"):
        reasons = {k.backend: why for k, why in registry.explain(op, h100, BF16)}
        assert reasons == {"triton": None, "reference": None}, reasons
        assert registry.select(op, h100, BF16).backend == "triton"
        assert registry.select(op, registry.DeviceInfo.of("cpu"), BF16).backend == "reference"


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
def test_gpu_ops_dispatch_to_triton_and_graph_replay_equals_eager(gen: torch.Generator) -> None:
    case = CASES["fused_bf16_moonlight"]
    t = make_inputs(case, 11, "cuda")

    def step() -> tuple[torch.Tensor, ...]:
        h, s = ops.fused_add_rms_norm(t["x"], t["residual"], t["weight"], 1e-6)
        return ops.rms_norm(h, t["weight"], 1e-6), s, ops.silu_and_mul(torch.cat([h, s], dim=-1))

    graph, captured = capture_graph(step)
    t["x"].copy_(torch.randn(case.shape, generator=gen).to(BF16))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, step(), strict=True):
        assert torch.equal(a, b)


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    interpret_main({cid: partial(run_case, case) for cid, case in CASES.items()}, int(sys.argv[2]))
