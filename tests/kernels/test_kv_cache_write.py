"""tokenspeed::kv_cache_write (quantise on store) and kv_cache_gather (dequantise on read).

The CPU op is the torch reference; it is checked here against a brute-force oracle (the
nearest of all 254 finite e4m3fn values, ties to the even code), and the Triton kernel against
the reference byte for byte: under the Triton interpreter in a subprocess (TRITON_INTERPRET must
be set before Triton decorates the kernels) and on the GPU (``-m gpu``).
"""

from __future__ import annotations

import random
import sys
from functools import partial
from typing import Any

import pytest
import torch

import tokenspeed_kernels  # noqa: F401  (registers the ops)
from tokenspeed_kernels.ops import kv_cache_gather, kv_cache_write
from tokenspeed_kernels.reference import kv_cache_write_ref, quantize_e4m3
from tokenspeed_kernels.testing import TOLERANCES, assert_close, compare
from tokenspeed_kernels.testing.graphs import capture_graph
from tokenspeed_kernels.testing.interpreter import interpret_main, run_in_interpreter

F8 = torch.float8_e4m3fn
NAN_BYTES = (0x7F, 0xFF)


def nearest_e4m3_oracle(x: torch.Tensor) -> torch.Tensor:
    """Byte codes by exhaustive search: nearest finite e4m3fn value, ties to the even code,
    saturated to +-448, NaN -> 0x7F / 0xFF by sign. Shares nothing with the reference."""
    codes = torch.arange(256, dtype=torch.int64)
    values = codes.to(torch.uint8).view(F8).double()
    finite = ~torch.isnan(values)
    codes, values = codes[finite], values[finite]
    xd = x.double().clamp(-448.0, 448.0)
    dist = (xd.unsqueeze(-1) - values).abs()
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist == best
    # among equally near codes prefer an even mantissa (code & 1 == 0); -0 vs +0 by the sign of x
    score = tied.to(torch.int64) * 4 + tied.to(torch.int64) * ((codes & 1) == 0) * 2
    score = score + tied.to(torch.int64) * ((codes >= 128) == (torch.signbit(x.double())).unsqueeze(-1))
    out = codes[score.argmax(dim=-1)]
    nan = torch.isnan(x)
    out = torch.where(nan & ~torch.signbit(x), torch.full_like(out, 0x7F), out)
    out = torch.where(nan & torch.signbit(x), torch.full_like(out, 0xFF), out)
    return out.to(torch.uint8)


def e4m3_probe_values(gen: torch.Generator) -> torch.Tensor:
    """Every finite code's value, the midpoints between neighbours (ties) and one fp32 ulp either
    side, random values over the whole range, out-of-range values, zeros and NaNs of both signs."""
    v = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(F8).float()
    v = v[~torch.isnan(v)].sort().values
    mids = (v[1:].double() + v[:-1].double()) / 2
    mids = mids.float()
    up, down = torch.nextafter(mids, torch.tensor(float("inf"))), torch.nextafter(mids, torch.tensor(float("-inf")))
    rand = torch.randn(4000, generator=gen) * torch.exp2(torch.randint(-12, 10, (4000,), generator=gen).float())
    special = torch.tensor([0.0, -0.0, 448.0, -448.0, 464.0, 480.0, 1e9, -1e9, float("inf"), float("-inf"),
                            float("nan"), -float("nan"), 2.0**-10, -(2.0**-10), 2.0**-9, 3 * 2.0**-10])  # fmt: skip
    return torch.cat([v, mids, up, down, rand, special])


def test_quantize_matches_nearest_value_oracle(gen: torch.Generator) -> None:
    x = e4m3_probe_values(gen)
    for scale in (1.0, 0.37, 2.0**-5):
        s = torch.tensor([scale])
        stored = x * scale
        got = quantize_e4m3(stored, s).view(torch.uint8)
        want = nearest_e4m3_oracle(stored / s)  # the oracle checks the rounding of the fp32 quotient
        bad = (got != want).nonzero().flatten()
        assert bad.numel() == 0, f"scale {scale}: {bad.numel()} codes differ, first x={x[bad[0]].item()!r}: " \
                                 f"got {got[bad[0]].item():#x}, want {want[bad[0]].item():#x}"  # fmt: skip


def _cache_with_nan_bytes(num_pages: int, page_size: int, row: tuple[int, ...]) -> torch.Tensor:
    cache = torch.empty(num_pages, page_size, *row, dtype=torch.uint8)
    flat = cache.view(-1)
    flat[0::2], flat[1::2] = NAN_BYTES
    return cache.view(F8)


@pytest.mark.parametrize("row", [(576,), (80,), (3, 24)])
def test_write_then_gather_round_trip(row: tuple[int, ...], gen: torch.Generator) -> None:
    """Written rows come back within half an e4m3 ulp of values / scale; every other byte keeps its
    NaN pattern (the write touches its slots only; negative slots are skipped)."""
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    num_pages, page_size = 7, rng.choice([1, 4, 16])
    cache = _cache_with_nan_bytes(num_pages, page_size, row)
    before = cache.view(torch.uint8).clone()
    n = rng.randrange(1, num_pages * page_size)
    slots = torch.tensor(rng.sample(range(num_pages * page_size), n), dtype=torch.int64)
    slots[rng.randrange(n)] = -1  # a padding row
    scale = torch.tensor([rng.choice([1.0, 0.05, 3.0])])
    values = (torch.randn(n, *row, generator=gen) * rng.choice([0.3, 1.0, 20.0])).to(torch.bfloat16)
    kv_cache_write(cache, slots, values, scale)

    kept = slots >= 0
    back = kv_cache_gather(cache, slots[kept], scale)
    assert back.dtype == torch.float32 and back.shape == (int(kept.sum()), *row)
    expected = (values[kept].double() / scale.double()).clamp(-448, 448)
    assert_close(back.double() / scale.double(), expected, "kv_fp8_store", F8, f"round trip, scale {scale.item()}")
    # bytes outside the written slots are untouched
    written = torch.zeros(num_pages * page_size, dtype=torch.bool)
    written[slots[kept]] = True
    untouched = before.view(num_pages * page_size, -1)[~written]
    assert torch.equal(cache.view(torch.uint8).view(num_pages * page_size, -1)[~written], untouched)


def test_saturates_and_keeps_nan() -> None:
    cache = _cache_with_nan_bytes(1, 4, (4,))
    values = torch.tensor([[1000.0, -1000.0, float("nan"), 0.5]] * 2)
    kv_cache_write(cache, torch.tensor([0, 3]), values, torch.tensor([0.5]))
    got = cache.view(torch.uint8)[0]
    assert got[0].tolist() == [0x7E, 0xFE, 0x7F, 0x38] and got[3].tolist() == got[0].tolist()  # 448, -448, NaN, 1.0
    assert got[1].tolist() == [0x7F, 0xFF, 0x7F, 0xFF]  # untouched NaN pattern


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_fp8_cache_is_a_plain_cast(dtype: torch.dtype, gen: torch.Generator) -> None:
    cache = torch.full((3, 4, 2, 8), float("nan"), dtype=dtype)
    values = torch.randn(5, 2, 8, generator=gen)
    slots = torch.tensor([11, 0, -1, 5, 6])
    kv_cache_write(cache, slots, values)
    flat = cache.view(12, 2, 8)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], values[t].to(dtype))
    assert torch.isnan(flat[1]).all()
    assert torch.equal(kv_cache_gather(cache, torch.tensor([11, 5]), dtype=torch.float32), values[[0, 3]].to(dtype).float())


def _args(**overrides: Any) -> dict[str, Any]:
    args = dict(kv_cache=torch.zeros(2, 4, 8, dtype=F8), slots=torch.tensor([1, 6]), values=torch.randn(2, 8),
                kv_scale=torch.tensor([1.0]))  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(kv_cache=torch.zeros(2, 4, 8, dtype=torch.float64)), r"kv_cache must be bfloat16/float16/float32/float8_e4m3fn"),
        (dict(kv_cache=torch.zeros(2, 4, 8, dtype=torch.float8_e5m2)), r"kv_cache must be .*got torch.float8_e5m2"),
        (dict(values=torch.randn(2, 8).double()), r"values must be bfloat16/float16/float32, got torch.float64"),
        (dict(slots=torch.tensor([1.0, 2.0])), r"slots must be int64 or int32"),
        (dict(kv_scale=None), r"kv_scale \(float32 \[1\]\) is required"),
        (dict(kv_scale=torch.tensor([1.0], dtype=torch.float16)), r"kv_scale must be float32, got torch.float16"),
        (dict(kv_scale=torch.ones(2)), r"kv_scale must hold one per-tensor scale, got shape \(2,\)"),
        (dict(kv_cache=torch.zeros(2, 4, 8)), r"kv_scale is only meaningful with a float8_e4m3fn kv_cache"),
        (dict(kv_cache=torch.zeros(8, 8, dtype=F8)), r"kv_cache must be \[num_pages, page_size, ...\]"),
        (dict(slots=torch.tensor([[1, 6]])), r"slots must be 1-D"),
        (dict(values=torch.randn(3, 8)), r"values must be \[tokens=2, ...\]"),
        (dict(values=torch.randn(2, 9)), r"values.shape\[1:\] \(9,\) must equal kv_cache.shape\[2:\] \(8,\)"),
        (dict(slots=torch.tensor([1, 8])), r"slots\[1\] = 8 is past the cache \(8 slots"),
        (dict(kv_scale=torch.tensor([0.0])), r"kv_scale must be positive and finite, got 0.0"),
        (dict(kv_scale=torch.tensor([float("nan")])), r"kv_scale must be positive and finite"),
    ],
)
def test_bad_input_names_the_argument(overrides: dict[str, Any], pattern: str) -> None:
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        kv_cache_write(**_args(**overrides))


def test_opcheck_and_compile(gen: torch.Generator) -> None:
    # opcheck's schema test compares values with ops torch lacks for fp8 (mul on Float8_e4m3fn), so
    # the schema (mutation annotations: the same schema for every dtype) is checked on a bf16 cache
    full = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for cache, scale, utils in (
        (torch.zeros(3, 4, 16, dtype=F8), torch.tensor([0.5]), full[1:]),
        (torch.zeros(3, 4, 16, dtype=torch.bfloat16), None, full),
    ):
        args = (cache, torch.tensor([0, 5, -1, 11]), torch.randn(4, 16, generator=gen), scale)
        torch.library.opcheck(torch.ops.tokenspeed.kv_cache_write.default, args, test_utils=utils)

    def step(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        torch.ops.tokenspeed.kv_cache_write(cache, slots, values, scale)
        return kv_cache_gather(cache, slots, scale)

    cache = torch.zeros(3, 4, 16, dtype=F8)
    values = torch.randn(4, 16, generator=gen)
    slots, scale = torch.tensor([0, 5, 7, 11]), torch.tensor([0.5])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(cache, slots, values, scale)
    ref_cache = torch.zeros(3, 4, 16, dtype=F8)
    kv_cache_write_ref(ref_cache, slots, values, scale)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert torch.equal(got, kv_cache_gather(ref_cache, slots, scale))


def test_registry_offers_the_write() -> None:
    from tokenspeed_kernels import registry

    assert registry.select("kv_cache_write", "cpu", torch.bfloat16).backend == "reference"
    assert registry.select("kv_cache_write", registry.H100, torch.bfloat16).backend == "triton"
    assert registry.select("kv_cache_write", registry.A100, torch.bfloat16).backend == "reference"  # no e4m3 cvt


# ------------------------------------------------------------------ Triton kernel vs reference
# id: (cache dtype, page_size, row shape, values dtype, scale)
KERNEL_CASES: dict[str, tuple[Any, ...]] = {
    "fp8-p64-576-bf16": ("float8_e4m3fn", 64, (576,), "bfloat16", 1.0),
    "fp8-p16-576-fp32-scale": ("float8_e4m3fn", 16, (576,), "float32", 0.0371),
    "fp8-p1-80-fp16": ("float8_e4m3fn", 1, (80,), "float16", 4.0),
    "fp8-p4-mha-3x24": ("float8_e4m3fn", 4, (3, 24), "bfloat16", 0.5),
    "fp8-p8-1500-wide": ("float8_e4m3fn", 8, (1500,), "float32", 1.0),
    "bf16-p16-576": ("bfloat16", 16, (576,), "float32", None),
}


def run_kernel_case(case: tuple[Any, ...], seed: int, device: str = "cpu") -> dict[str, Any]:
    from tokenspeed_kernels.triton.kv_cache_write import kv_cache_write as triton_write

    cache_name, page_size, row, values_name, scale = case
    dtype = getattr(torch, cache_name)
    gen = torch.Generator().manual_seed(seed)
    num_pages = 6
    if dtype == F8:
        cache = _cache_with_nan_bytes(num_pages, page_size, row)
    else:
        cache = torch.full((num_pages, page_size, *row), float("nan"), dtype=dtype)
    cache = cache.to(device)
    n = min(num_pages * page_size, 9)
    slots = torch.randperm(num_pages * page_size, generator=gen)[:n]
    slots[n // 2] = -1
    spread = torch.exp2(torch.randint(-12, 10, (n, *row), generator=gen).float())
    values = (torch.randn(n, *row, generator=gen) * spread).to(getattr(torch, values_name))
    values.view(-1)[:3] = torch.tensor([float("nan"), 1e6, -1e6]).to(values.dtype)
    s = torch.tensor([scale], device=device) if scale is not None else None
    ref = cache.cpu().clone()
    kv_cache_write_ref(ref, slots, values, s.cpu() if s is not None else None)
    triton_write(cache, slots.to(device), values.to(device), s)
    return _byte_report(cache.cpu(), ref, values, slots, seed)


def _byte_report(got: torch.Tensor, ref: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, seed: int) -> dict[str, Any]:
    """ok when the caches agree byte for byte (NaN = NaN for a bf16 cache); the report names the
    first differing element, the value written there and both codes."""
    if got.dtype == F8:
        bad = got.view(torch.uint8) != ref.view(torch.uint8)
    else:
        bad = ~((got == ref) | (torch.isnan(got) & torch.isnan(ref)))
    diff = int(bad.sum())
    report = f"seed={seed}: {diff} bytes/elements differ from the reference"
    if diff:
        rows = got.flatten(0, 1).flatten(1)
        row, col = (int(i) for i in bad.flatten(0, 1).flatten(1).nonzero()[0])
        token = int((slots == row).nonzero()[0, 0]) if bool((slots == row).any()) else None
        value = float(values.reshape(values.shape[0], -1)[token, col]) if token is not None else None
        as_int = (lambda t: int(t.view(torch.uint8))) if got.dtype == F8 else float
        report += (f"; first at slot {row}, column {col}: value {value!r}, got {as_int(rows[row, col])}, "
                   f"want {as_int(ref.flatten(0, 1).flatten(1)[row, col])}")  # fmt: skip
    return {"ok": diff == 0, "report": report}


def run_every_bf16_case(scale: float, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Every bf16 bit pattern (zeros, subnormals, ties, 448 +- ulp, inf, NaN) through the fp8 write:
    the bytes equal the reference's for each one, not only for the values random data hits."""
    from tokenspeed_kernels.triton.kv_cache_write import kv_cache_write as triton_write

    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(128, 512)
    slots = torch.arange(128)
    cache = _cache_with_nan_bytes(2, 64, (512,)).to(device)
    s = torch.tensor([scale])
    ref = cache.cpu().clone()
    kv_cache_write_ref(ref, slots, values, s)
    triton_write(cache, slots.to(device), values.to(device), s.to(device))
    return _byte_report(cache.cpu(), ref, values, slots, seed)


EVERY_BF16_SCALES = {"fp8-every-bf16-scale1": 1.0, "fp8-every-bf16-scale0.0371": 0.0371}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, Any]]:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case_id", [*KERNEL_CASES, *EVERY_BF16_SCALES])
def test_triton_interpreter_matches_reference_bytes(case_id: str, interpreter_results: dict[str, dict[str, Any]]) -> None:
    result = interpreter_results[case_id]
    assert result["ok"], result["report"]


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", list(KERNEL_CASES))
def test_gpu_matches_reference_bytes(case_id: str, gen: torch.Generator) -> None:
    result = run_kernel_case(KERNEL_CASES[case_id], int(torch.randint(0, 2**31, (1,), generator=gen)), "cuda")
    assert result["ok"], result["report"]


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", list(EVERY_BF16_SCALES))
def test_gpu_every_bf16_value_matches_reference_bytes(case_id: str) -> None:
    result = run_every_bf16_case(EVERY_BF16_SCALES[case_id], 0, "cuda")
    assert result["ok"], result["report"]


@pytest.mark.gpu
def test_gpu_write_in_cuda_graph(gen: torch.Generator) -> None:
    """Slots and values change between capture and replay (no host sync, no shape dependence)."""
    cache = torch.zeros(8, 16, 576, dtype=F8, device="cuda")
    slots = torch.tensor([3, 70, 5, -1], device="cuda")
    values = torch.randn(4, 576, generator=gen).to(torch.bfloat16).cuda()
    scale = torch.tensor([0.25], device="cuda")
    graph, _ = capture_graph(lambda: kv_cache_write(cache, slots, values, scale))
    cache.zero_()
    slots.copy_(torch.tensor([100, -1, 1, 2]))
    values.copy_(torch.randn(4, 576, generator=gen).to(torch.bfloat16))
    graph.replay()
    ref = torch.zeros(8, 16, 576, dtype=F8)
    kv_cache_write_ref(ref, slots.cpu(), values.cpu(), scale.cpu())
    assert torch.equal(cache.cpu().view(torch.uint8), ref.view(torch.uint8))
    back = kv_cache_gather(cache, slots[slots >= 0], scale)
    c = compare(back.double() / 0.25, (values[slots >= 0].double() / 0.25).clamp(-448, 448), TOLERANCES["kv_fp8_store"][F8])
    assert c.ok, c.report("graph round trip")


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    cases = {cid: partial(run_kernel_case, case) for cid, case in KERNEL_CASES.items()}
    cases |= {cid: partial(run_every_bf16_case, scale) for cid, scale in EVERY_BF16_SCALES.items()}
    interpret_main(cases, int(sys.argv[2]))
