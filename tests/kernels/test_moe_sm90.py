"""The Hopper (sm_90a) MoE backend: ``tokenspeed::grouped_gemm`` and the ``cuda_sm90`` fused_moe.

CPU: the grouped_gemm schema, CPU reference, fake (opcheck) and argument checks; the per-expert
reference (``fused_moe_by_expert_ref``) against the slot-by-slot ``fused_moe_ref``; the fp8
tolerance's calibration; the registry entry.
GPU (``-m gpu``, Hopper only): grouped GEMMs (bf16; fp8 with 1x128 / 128x128 block scales;
both compiled tiles) and fused_moe (each tile, and the decode path of grouped GEMVs)
against fp64 (bf16) / fp32 (fp8, the contract) references within the MoE tolerance table,
including experts with no, one and all rows; DeepSeek-V3
shapes (hidden 7168, intermediate 2048 and 512, 256 experts top-8 routed onto 256 or 64
local experts); CUDA-graph replay equal to eager bitwise; opcheck on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import torch

import tokenspeed_kernels as tk
from tokenspeed_kernels import registry
from tokenspeed_kernels.backends.moe_sm90 import grouped_gemm
from tokenspeed_kernels.reference import fused_moe_by_expert_ref, fused_moe_ref, moe_route_ref
from tokenspeed_kernels.reference.moe import dequant_fp8_block_weight
from tokenspeed_kernels.testing import TOLERANCES, assert_close, compare
from tokenspeed_kernels.testing.graphs import capture_graph

FP8 = torch.float8_e4m3fn
BLOCK = 128
# Compiled GEMM tiles per dtype: bf16 has a 64-row decode tile, fp8 one tile for all sizes.
TILES = {False: ("large", "small"), True: ("large",)}
# fused_moe's paths: the tiles, and the decode path (grouped GEMVs, 4 rows per task).
MOE_PATHS = {False: ("large", "small", "decode"), True: ("large", "decode")}
# opcheck's test_schema compares inputs before/after with allclose, which torch does not
# implement for float8 tensors; the other checks (fake, autograd, AOT dispatch) run.
FP8_OPCHECKS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


# --------------------------------------------------------------------------- references
def grouped_gemm_expected(a, w, offsets, a_scale=None, w_scale=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """float64: group g owns rows [end_{g-1}, end_g), end_g = min(max(0, offsets[:g+1]), rows)."""
    rows, n = a.shape[0], w.shape[1]
    ends = torch.cummax(offsets.long().clamp(min=0), 0).values.clamp(max=rows).tolist()
    out = torch.zeros(rows, n, dtype=torch.float64, device=a.device)
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            x = a[start:end].double()
            wg = w[g].double()
            if a.dtype == FP8:
                x = x * a_scale[start:end].double().repeat_interleave(BLOCK, 1)
                wg = dequant_fp8_block_weight(w[g], w_scale[g], torch.float64)
            out[start:end] = x @ wg.T
        start = end
    return out


# ------------------------------------------------------------------------------ inputs
def fp8_experts(e: int, n: int, k: int, gen: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights [e, n, k] whose dequantised values are ~N(0, 1/k), and their 128x128 scales."""
    w = torch.randn(e, n, k, generator=gen, device=device) * k**-0.5
    s = torch.rand(e, -(-n // BLOCK), -(-k // BLOCK), generator=gen, device=device) * 0.01 + 0.002
    q = (w / s.repeat_interleave(BLOCK, 1)[:, :n].repeat_interleave(BLOCK, 2)[:, :, :k]).to(FP8)
    return q, s


def experts(e: int, hidden: int, inter: int, fp8: bool, gen: torch.Generator, device: str) -> tuple[Any, ...]:
    if fp8:
        w13, s13 = fp8_experts(e, 2 * inter, hidden, gen, device)
        w2, s2 = fp8_experts(e, hidden, inter, gen, device)
        return w13, w2, s13, s2
    w13 = (torch.randn(e, 2 * inter, hidden, generator=gen, device=device) * hidden**-0.5).bfloat16()
    w2 = (torch.randn(e, hidden, inter, generator=gen, device=device) * inter**-0.5).bfloat16()
    return w13, w2, None, None


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-128-group e4m3 quantisation: values and float32 scales [rows, k/128]."""
    g = x.float().reshape(x.shape[0], -1, BLOCK)
    scale = g.abs().amax(-1).clamp_min(1e-10) / 448.0
    q = (g / scale[..., None]).clamp(-448.0, 448.0).to(FP8).reshape(x.shape)
    return q, scale


def _cuda_gen(gen: torch.Generator) -> torch.Generator:
    """A CUDA generator seeded from the test's CPU one: big inputs are drawn on the device."""
    return torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))


def offsets_of(counts: list[int], device: str) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def routing(kind: str, tokens: int, local: int, total: int, offset: int, top_k: int, gen: torch.Generator):  # type: ignore[no-untyped-def]
    """(weights, ids) on the CPU: softmax routing, or hand-made skewed / single-expert loads."""
    if kind == "route":
        w, ids = moe_route_ref(torch.randn(tokens, total, generator=gen), top_k, "softmax")
        if tokens > 1:
            ids[0] = ids[0, 0]  # one token routed to the same expert in every slot
        if offset and tokens > 2:
            ids[-1] = (offset + local) % total  # a token none of whose experts live on this rank
        return w, ids
    w = torch.rand(tokens, top_k, generator=gen)
    ids = torch.full((tokens, top_k), offset, dtype=torch.int32)  # every slot on the first local expert
    if kind == "skewed":
        ids[:, -1] = offset + local - 1
        off_rank = (offset + local) % total
        ids[min(4, tokens - 1), -1] = offset + 1 if local > 2 else off_rank  # expert 1 gets one row
        ids[min(5, tokens - 1), 0] = off_rank
    return w, ids


@pytest.fixture
def tile(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Force one compiled GEMM tile, or the decode path (the C++ heuristic reads TOKENSPEED_MOE_SM90_TILE per call)."""
    monkeypatch.setenv("TOKENSPEED_MOE_SM90_TILE", request.param)
    yield request.param


# ---------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
def test_grouped_gemm_cpu_reference(dtype: torch.dtype, gen: torch.Generator) -> None:
    """Non-monotone and out-of-range offsets, empty groups, a tail of rows past the last end."""
    rows, n, k = 23, 136, 256
    offsets = torch.tensor([3, 3, 1, 9, 40, 17], dtype=torch.int32)  # ends 3, 3, 3, 9, 23 (clamped), 23
    if dtype == FP8:
        a, a_scale = quant_rows(torch.randn(rows, k, generator=gen))
        w, w_scale = fp8_experts(6, n, k, gen, "cpu")
    else:
        a, a_scale = torch.randn(rows, k, generator=gen).to(dtype), None
        w, w_scale = torch.randn(6, n, k, generator=gen).to(dtype) * k**-0.5, None
    out = grouped_gemm(a, w, offsets, a_scale, w_scale)
    assert out.dtype == (torch.bfloat16 if dtype == FP8 else dtype) and out.shape == (rows, n)
    want = grouped_gemm_expected(a, w, offsets, a_scale, w_scale)
    assert_close(out, want, "moe", torch.float32 if dtype == torch.float32 else torch.bfloat16)
    tail = torch.tensor([0, 0, 0, 0, 0, 20], dtype=torch.int32)
    assert grouped_gemm(a, w, tail, a_scale, w_scale)[20:].abs().sum() == 0


def test_grouped_gemm_opcheck_cpu(gen: torch.Generator) -> None:
    a, w = torch.randn(9, 32, generator=gen), torch.randn(3, 16, 32, generator=gen)
    torch.library.opcheck(torch.ops.tokenspeed.grouped_gemm.default, (a, w, offsets_of([2, 0, 7], "cpu")))
    q, s = quant_rows(torch.randn(9, 128, generator=gen))
    wq, ws = fp8_experts(3, 16, 128, gen, "cpu")
    args = (q, wq, offsets_of([2, 0, 7], "cpu"), s, ws)
    torch.library.opcheck(torch.ops.tokenspeed.grouped_gemm.default, args, test_utils=FP8_OPCHECKS)


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"offsets": torch.zeros(3, dtype=torch.int64)}, r"offsets must be Int"),
        ({"offsets": torch.zeros(2, dtype=torch.int32)}, r"offsets\.shape\[0\] \(groups"),
        ({"w": torch.randn(3, 16, 64)}, r"w\.shape\[2\] \(k"),
        ({"a_scale": torch.ones(9, 1)}, r"only meaningful with float8"),
    ],
)
def test_grouped_gemm_bad_input(change: dict[str, Any], pattern: str) -> None:
    args = {"a": torch.randn(9, 128), "w": torch.randn(3, 16, 128), "offsets": torch.zeros(3, dtype=torch.int32)}
    args.update(change)
    with pytest.raises(RuntimeError, match=pattern):
        grouped_gemm(**args)


def test_grouped_gemm_fp8_needs_scales(gen: torch.Generator) -> None:
    q, s = quant_rows(torch.randn(4, 128, generator=gen))
    wq, ws = fp8_experts(2, 16, 128, gen, "cpu")
    with pytest.raises(RuntimeError, match=r"need a_scale"):
        grouped_gemm(q, wq, offsets_of([1, 3], "cpu"))
    with pytest.raises(RuntimeError, match=r"a_scale must have shape \[4, 1\]"):
        grouped_gemm(q, wq, offsets_of([1, 3], "cpu"), s[:, :0], ws)


@pytest.mark.parametrize("fp8", [False, True])
def test_expected_matches_official_reference(fp8: bool, gen: torch.Generator) -> None:
    """The per-expert reference the GPU tests use is the contract: it equals fused_moe_ref (slot by
    slot). In fp64 for fp8 experts too: in fp32 the two summation orders differ in the last bits,
    and now and then that flips an e4m3 rounding of the intermediate (a visible jump)."""
    tokens, local, total, offset, top_k, hidden, inter = 9, 4, 8, 4, 3, 256, 128
    w, ids = routing("route", tokens, local, total, offset, top_k, gen)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16().double()
    w13, w2, s13, s2 = experts(local, hidden, inter, fp8, gen, "cpu")
    got = fused_moe_by_expert_ref(x, w13, w2, w, ids, s13, s2, offset)
    want = fused_moe_ref(x, w13 if fp8 else w13.double(), w2 if fp8 else w2.double(), w, ids, s13, s2, offset)
    assert_close(got, want, "moe", torch.float64)


def _jitter(gate_up: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    return gate_up * (1 + 3e-3 * torch.randn(gate_up.shape, generator=noise))


def test_fp8_tolerance_admits_accumulation_noise_and_rejects_a_wrong_scale() -> None:
    """The "moe" fp8 row is calibrated here. A valid fp8 kernel differs from the fp32 contract
    by its accumulation: CUTLASS's blockwise-scaled wgmma adds 128-deep k blocks in the tensor
    core's reduced-precision accumulator before promoting to fp32 (DeepGEMM does the same), a
    relative noise of order 1e-3 on gate/up. That flips e4m3 roundings of the intermediate, and
    a flip near a group's amax moves an output by a visible amount. On the H100 the sm90 kernel
    missed the previous row (2e-2, 5e-2, 1e-1) by up to 1.8x on these cases; the reference
    with 3e-3 noise misses it by up to 1.9x. The row must admit that noise on every seed and
    still catch a 25% error in one 128x128 weight-scale block where its expert has rows."""
    fails_noise, caught, bugs = [], 0, 0
    for case_id in ("fp8-block-scaled", "fp8-ep-skewed", "fp8-all-on-one-expert"):
        _, tokens, local, total, offset, top_k, hidden, inter, kind = MOE_CASES[case_id]
        for seed in range(12):
            gen = torch.Generator().manual_seed(seed)
            w, ids = routing(kind, tokens, local, total, offset, top_k, gen)
            x = torch.randn(tokens, hidden, generator=gen).bfloat16()
            w13, w2, s13, s2 = experts(local, hidden, inter, True, gen, "cpu")
            want = fused_moe_by_expert_ref(x, w13, w2, w, ids, s13, s2, offset)
            noise = torch.Generator().manual_seed(1000 + seed)
            noisy = fused_moe_by_expert_ref(x, w13, w2, w, ids, s13, s2, offset, partial(_jitter, noise=noise))
            c = compare(noisy.double(), want.double(), TOLERANCES["moe"][FP8])
            if not c.ok:
                fails_noise.append(c.report(f"{case_id} seed {seed}"))
            busy = int(torch.mode((ids.long() - offset).flatten()).values)  # the expert with most rows
            if 0 <= busy < local:
                s13_bad = s13.clone()
                s13_bad[busy, 0, -1] *= 1.25
                bugs += 1
                caught += not compare(fused_moe_by_expert_ref(x, w13, w2, w, ids, s13_bad, s2, offset).double(), want.double(),
                                      TOLERANCES["moe"][FP8]).ok  # fmt: skip
    assert not fails_noise, fails_noise
    assert caught >= 0.9 * bugs, f"a wrong weight scale passed in {bugs - caught} of {bugs} cases"


def test_registration() -> None:
    cuda_built = tk.build_info()["cuda"]
    # verified on an H100: it outranks Triton on Hopper in a CUDA build, and only there
    assert registry.select("fused_moe", registry.H100, torch.bfloat16).backend == ("cuda_sm90" if cuda_built else "triton")
    assert registry.select("fused_moe", registry.H100, torch.bfloat16, verified_only=True).backend == (
        "cuda_sm90" if cuda_built else "triton"
    )
    assert registry.select("fused_moe", registry.H100, torch.float16).backend == "triton"  # bf16 activations only
    for dev in (registry.A100, registry.B200):  # sm_90a code runs on Hopper only
        assert registry.select("fused_moe", dev, torch.bfloat16).backend == "triton"
    with registry.use_backend("cuda_sm90", "fused_moe"):
        k = registry.select("fused_moe", registry.H100, torch.bfloat16) if cuda_built else None
        assert k is None or k.impl == "tokenspeed_kernels.ops.moe:fused_moe"


# ---------------------------------------------------------------------------------- GPU

# id: (group row counts, n, k, extra tail rows)
GEMM_CASES: dict[str, tuple[list[int], int, int, int]] = {
    "ragged-empty-one-large": ([0, 1, 130, 7, 0, 64, 257, 3], 384, 256, 0),
    "all-rows-one-group": ([0, 0, 300, 0], 256, 384, 0),
    "tail-rows-zeroed": ([5, 70, 0], 128, 128, 9),
    "deepseek-gate-up": ([200, 37, 0, 129], 4096, 7168, 0),
    "deepseek-down": ([200, 37, 0, 129], 7168, 2048, 0),
}


@pytest.mark.parametrize("fp8,tile", [(f, t) for f in (False, True) for t in TILES[f]], indirect=["tile"])
@pytest.mark.parametrize("case_id", list(GEMM_CASES))
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_grouped_gemm(case_id: str, fp8: bool, tile: str, gen: torch.Generator) -> None:
    counts, n, k, tail = GEMM_CASES[case_id]
    g = _cuda_gen(gen)
    rows = sum(counts) + tail
    offsets = offsets_of(counts, "cuda")
    if fp8:
        a, a_scale = quant_rows(torch.randn(rows, k, generator=g, device="cuda"))
        w, w_scale = fp8_experts(len(counts), n, k, g, "cuda")
    else:
        a, a_scale = torch.randn(rows, k, generator=g, device="cuda").bfloat16(), None
        w, w_scale = (torch.randn(len(counts), n, k, generator=g, device="cuda") * k**-0.5).bfloat16(), None
    out = grouped_gemm(a, w, offsets, a_scale, w_scale)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert_close(out, grouped_gemm_expected(a, w, offsets, a_scale, w_scale), "moe", torch.bfloat16, f"tile {tile}")
    assert torch.equal(out, grouped_gemm(a, w, offsets, a_scale, w_scale)), "not deterministic"


# id: (fp8, tokens, local experts, global experts, expert_offset, top_k, hidden, intermediate, routing)
MOE_CASES: dict[str, tuple[Any, ...]] = {
    "bf16-route": (False, 13, 8, 8, 0, 3, 256, 128, "route"),
    "bf16-odd-dims": (False, 9, 6, 6, 0, 2, 136, 40, "route"),
    "bf16-skewed": (False, 20, 6, 6, 0, 2, 128, 64, "skewed"),
    "bf16-all-on-one-expert": (False, 40, 4, 4, 0, 1, 128, 64, "one"),
    "bf16-ep-offset": (False, 11, 4, 12, 4, 3, 256, 128, "route"),
    "bf16-one-token": (False, 1, 8, 8, 0, 4, 256, 128, "route"),
    "bf16-long-k-odd-rows": (False, 7, 5, 5, 0, 3, 1096, 264, "route"),  # K = 17 x 64 + 8, 5 rows / expert
    "fp8-block-scaled": (True, 7, 4, 4, 0, 2, 256, 128, "route"),
    "fp8-ep-skewed": (True, 9, 2, 4, 2, 2, 256, 256, "skewed"),
    "fp8-all-on-one-expert": (True, 33, 3, 3, 0, 2, 384, 256, "one"),
}


def _check_moe(out: torch.Tensor, want: torch.Tensor, fp8: bool, what: str) -> None:
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    assert_close(out, want, "moe", FP8 if fp8 else torch.bfloat16, what)


@pytest.mark.parametrize("case_id,tile", [(c, t) for c, case in MOE_CASES.items() for t in MOE_PATHS[case[0]]], indirect=["tile"])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_fused_moe_cases(case_id: str, tile: str, gen: torch.Generator) -> None:
    fp8, tokens, local, total, offset, top_k, hidden, inter, kind = MOE_CASES[case_id]
    w, ids = routing(kind, tokens, local, total, offset, top_k, gen)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    w13, w2, s13, s2 = experts(local, hidden, inter, fp8, gen, "cpu")
    args = [t.cuda() if t is not None else None for t in (x, w13, w2, w.float(), ids.int(), s13, s2)]
    out = tk.fused_moe(*args, offset)
    ref_x = args[0] if fp8 else args[0].double()
    _check_moe(out, fused_moe_by_expert_ref(ref_x, *args[1:], offset), fp8, f"{case_id} tile {tile}")
    assert torch.equal(out, tk.fused_moe(*args, offset)), "not deterministic"


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_fused_moe_no_tokens() -> None:
    x = torch.empty(0, 128, device="cuda", dtype=torch.bfloat16)
    w13, w2 = torch.zeros(2, 64, 128, device="cuda").bfloat16(), torch.zeros(2, 128, 32, device="cuda").bfloat16()
    ids = torch.empty(0, 2, device="cuda", dtype=torch.int32)
    assert tk.fused_moe(x, w13, w2, ids.float(), ids).shape == (0, 128)


DS_HIDDEN, DS_EXPERTS, DS_TOP_K = 7168, 256, 8


def _ds_routing(tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid + bias, 8 groups, top-4 groups, top-8 of 256 experts."""
    logits = torch.randn(tokens, DS_EXPERTS, generator=g, device="cuda")
    bias = torch.rand(DS_EXPERTS, generator=g, device="cuda") * 0.1
    return moe_route_ref(logits, DS_TOP_K, "sigmoid", bias, 8, 4, True, 2.5)


def _ds_inputs(tokens: int, local: int, inter: int, fp8: bool, gen: torch.Generator) -> tuple[Any, ...]:
    g = _cuda_gen(gen)
    w, ids = _ds_routing(tokens, g)
    x = torch.randn(tokens, DS_HIDDEN, generator=g, device="cuda").bfloat16()
    return (x, *experts(local, DS_HIDDEN, inter, fp8, g, "cuda"), w, ids)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("inter", [2048, 512])
@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_deepseek_ep4(tokens: int, inter: int, fp8: bool, gen: torch.Generator) -> None:
    """64 local experts of 256 (EP4): ranks 0 and 1 (expert_offset 0, 64)."""
    x, w13, w2, s13, s2, w, ids = _ds_inputs(tokens, 64, inter, fp8, gen)
    for offset in (0, 64):
        out = tk.fused_moe(x, w13, w2, w, ids, s13, s2, offset)
        want = fused_moe_by_expert_ref(x if fp8 else x.double(), w13, w2, w, ids, s13, s2, offset)
        _check_moe(out, want, fp8, f"T{tokens} I{inter} offset {offset}")


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_deepseek_all_256_local(tokens: int, fp8: bool, gen: torch.Generator) -> None:
    """All 256 experts on one rank (intermediate 512, the TP4 shard)."""
    x, w13, w2, s13, s2, w, ids = _ds_inputs(tokens, DS_EXPERTS, 512, fp8, gen)
    out = tk.fused_moe(x, w13, w2, w, ids, s13, s2, 0)
    _check_moe(out, fused_moe_by_expert_ref(x if fp8 else x.double(), w13, w2, w, ids, s13, s2, 0), fp8, f"T{tokens}")


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_many_tokens_large_tile(fp8: bool, gen: torch.Generator) -> None:
    """2048 tokens top-8 over 64 experts: ~256 rows per expert, the heuristic's 128-row tile."""
    g = _cuda_gen(gen)
    tokens, local, hidden, inter = 2048, 64, 1024, 512
    w, ids = moe_route_ref(torch.randn(tokens, local, generator=g, device="cuda"), 8, "softmax")
    x = torch.randn(tokens, hidden, generator=g, device="cuda").bfloat16()
    w13, w2, s13, s2 = experts(local, hidden, inter, fp8, g, "cuda")
    out = tk.fused_moe(x, w13, w2, w, ids, s13, s2, 0)
    _check_moe(out, fused_moe_by_expert_ref(x if fp8 else x.double(), w13, w2, w, ids, s13, s2, 0), fp8, "T2048")


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tile", ["decode"], indirect=True)
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_decode_path_over_chunked_route_map(tile: str, fp8: bool, gen: torch.Generator) -> None:
    """The decode path forced at 1600 slots: its task list comes from the multi-chunk route map."""
    g = _cuda_gen(gen)
    tokens, local, hidden, inter = 200, 16, 256, 128
    w, ids = moe_route_ref(torch.randn(tokens, local, generator=g, device="cuda"), 8, "softmax")
    x = torch.randn(tokens, hidden, generator=g, device="cuda").bfloat16()
    w13, w2, s13, s2 = experts(local, hidden, inter, fp8, g, "cuda")
    out = tk.fused_moe(x, w13, w2, w, ids, s13, s2, 0)
    want = fused_moe_by_expert_ref(x if fp8 else x.double(), w13, w2, w, ids, s13, s2, 0)
    _check_moe(out, want, fp8, "T200 decode path")


@pytest.mark.parametrize("tokens", [8, 1024])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_cuda_graph_replay_equals_eager_bitwise(fp8: bool, tokens: int, gen: torch.Generator) -> None:
    """fused_moe captured once; new activations and a new routing written in place before the replay."""
    x, w13, w2, s13, s2, w, ids = _ds_inputs(tokens, 64, 512, fp8, gen)
    w_next, ids_next = _ds_routing(tokens, _cuda_gen(gen))

    def step() -> torch.Tensor:
        return tk.fused_moe(x, w13, w2, w, ids, s13, s2, 64)

    before = step()
    graph, captured = capture_graph(step)
    x.copy_(torch.randn_like(x, dtype=torch.float32).bfloat16())
    w.copy_(w_next)
    ids.copy_(ids_next)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    assert torch.equal(captured, eager) and not torch.equal(captured, before)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_opcheck(fp8: bool, gen: torch.Generator) -> None:
    tokens, local, hidden, inter, top_k = 6, 4, 256, 128, 2
    w, ids = routing("route", tokens, local, local, 0, top_k, gen)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    w13, w2, s13, s2 = experts(local, hidden, inter, fp8, gen, "cpu")
    args = tuple(t.cuda() if t is not None else None for t in (x, w13, w2, w.float(), ids.int(), s13, s2)) + (0,)
    checks = FP8_OPCHECKS if fp8 else ("test_schema", *FP8_OPCHECKS)
    torch.library.opcheck(torch.ops.tokenspeed.fused_moe.default, args, test_utils=checks)
    offsets = offsets_of([3, 0, 5], "cuda")
    if fp8:
        a, a_scale = quant_rows(torch.randn(8, hidden, generator=gen).cuda())
        wq, ws = fp8_experts(3, 128, hidden, gen, "cpu")
        gemm_args = (a, wq.cuda(), offsets, a_scale, ws.cuda())
    else:
        gemm_args = (torch.randn(8, hidden, generator=gen).bfloat16().cuda(), torch.randn(3, 128, hidden).bfloat16().cuda(),
                     offsets, None, None)  # fmt: skip
    torch.library.opcheck(torch.ops.tokenspeed.grouped_gemm.default, gemm_args, test_utils=checks)


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_refuses_what_it_does_not_cover() -> None:
    x = torch.randn(4, 128, device="cuda", dtype=torch.float16)
    w13, w2 = torch.zeros(2, 64, 128, device="cuda").half(), torch.zeros(2, 128, 32, device="cuda").half()
    ids = torch.zeros(4, 1, device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"hidden_states must be bfloat16.*registry"):
        tk.fused_moe(x, w13, w2, ids.float(), ids)
    xb = torch.randn(4, 132, device="cuda", dtype=torch.bfloat16)
    w13b, w2b = torch.zeros(2, 64, 132, device="cuda").bfloat16(), torch.zeros(2, 132, 32, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match=r"multiples of 8"):
        tk.fused_moe(xb, w13b, w2b, ids.float(), ids)
    # fp8 experts need whole 128-value scale blocks (the contract's check, shared by every backend)
    xf = torch.randn(4, 192, device="cuda", dtype=torch.bfloat16)
    w13f, s13 = fp8_experts(2, 256, 192, torch.Generator().manual_seed(0), "cpu")
    w2f, s2 = fp8_experts(2, 192, 128, torch.Generator().manual_seed(1), "cpu")
    with pytest.raises(RuntimeError, match=r"fp8 experts need hidden \(192\).*multiples of 128"):
        tk.fused_moe(xf, w13f.cuda(), w2f.cuda(), ids.float(), ids, s13.cuda(), s2.cuda())
