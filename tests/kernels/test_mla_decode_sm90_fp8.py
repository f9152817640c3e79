"""The Hopper MLA decode kernel over an fp8 (e4m3fn) latent cache (torch.ops.tokenspeed.mla_decode on
CUDA with kv_scale) against the fp64 reference on the dequantised cache (``codes * kv_scale``).

Caches from make_paged_kv: pages in random order, e4m3fn NaN bytes in every slot and page the kernel
must not read. Tolerances: the fp8 rows of the table (the kernel widens codes to f16 exactly; Q is
rounded to f16 after a power-of-two scale, P to f16). Every case runs under both consumer families
of rows <= 32: the transposed ones (the default: register-widened over TMA stages at <= 16 rows,
producer-widened at <= 32) and the 64-row lockstep one. Skipped cleanly without a Hopper GPU.
"""

from __future__ import annotations

import random

import pytest
import torch

from tokenspeed_kernels.reference import mla_decode_ref
from tokenspeed_kernels.testing import assert_close, make_paged_kv, ragged_seqlens
from tokenspeed_kernels.testing.graphs import capture_graph

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

F8 = torch.float8_e4m3fn
DIM, DV = 576, 512
SCALE = 192**-0.5


@pytest.fixture(autouse=True, params=["transposed", "lockstep"])
def consumer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """At <= 32 rows the default schedule runs a transposed consumer (variant 5 at <= 16 rows, 6
    above) and TOKENSPEED_MLA_DECODE_SCHEDULE=lockstep the 64-row one (variant 2); above 32 rows
    both are variant 2. Read per call."""
    if request.param == "lockstep":
        monkeypatch.setenv("TOKENSPEED_MLA_DECODE_SCHEDULE", "lockstep")
    else:
        monkeypatch.delenv("TOKENSPEED_MLA_DECODE_SCHEDULE", raising=False)
    return request.param


def _case(gen, seqlens, heads, q_len, page, q_mag=1.0, kv_scale=None):
    paged = make_paged_kv(seqlens, page, DIM, F8, device="cuda", generator=gen)
    q = (torch.randn(len(seqlens), q_len, heads, DIM, generator=gen) * q_mag).to(torch.bfloat16).cuda()
    if kv_scale is None:
        kv_scale = float(torch.empty(1).uniform_(0.02, 3.0, generator=gen))
    return q, paged, torch.tensor([kv_scale], dtype=torch.float32, device="cuda")


def _decode(q, paged, kv_scale, causal=True):
    return torch.ops.tokenspeed.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, causal, DV, kv_scale)


def _reference(q, paged, kv_scale, causal=True):
    deq = paged.kv_cache.cpu().double() * kv_scale.cpu().double()  # NaN codes stay NaN; never read
    return mla_decode_ref(q.cpu().double(), deq, paged.block_table.cpu(), paged.cache_seqlens.cpu(), SCALE, causal, DV)


def _check(q, paged, kv_scale, causal=True, what=""):
    out, lse = _decode(q, paged, kv_scale, causal)
    torch.cuda.synchronize()
    ref_out, ref_lse = _reference(q, paged, kv_scale, causal)
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close(out, ref_out, "attention", F8, f"out {what}")
    assert_close(lse, ref_lse, "lse", F8, f"lse {what}")
    return out, lse


@pytest.mark.parametrize("q_len", [1, 2, 4, 8])
@pytest.mark.parametrize("heads", [16, 32, 64, 128])
def test_matches_reference_page64(heads: int, q_len: int, gen: torch.Generator) -> None:
    seqlens = ragged_seqlens(gen, q_len, 64)
    q, paged, kv_scale = _case(gen, seqlens, heads, q_len, 64)
    _check(q, paged, kv_scale, what=f"seqlens={seqlens}")


@pytest.mark.parametrize("page", [16, 32, 128, 256])
@pytest.mark.parametrize("heads,q_len", [(16, 1), (16, 2), (16, 4), (128, 2)])
def test_other_page_sizes(page: int, heads: int, q_len: int, gen: torch.Generator) -> None:
    seqlens = ragged_seqlens(gen, q_len, page)
    q, paged, kv_scale = _case(gen, seqlens, heads, q_len, page)
    _check(q, paged, kv_scale, what=f"page={page} seqlens={seqlens}")


@pytest.mark.parametrize("heads,q_len", [(16, 1), (32, 4), (100, 1), (12, 2)])
def test_non_causal_and_odd_head_counts(heads: int, q_len: int, gen: torch.Generator) -> None:
    q, paged, kv_scale = _case(gen, [700, 5, 130], heads, q_len, 64)
    _check(q, paged, kv_scale, causal=False, what="non-causal")


@pytest.mark.parametrize("heads,q_len", [(1, 1), (5, 3), (7, 2), (10, 3), (24, 1)])
def test_row_counts_below_16_and_between_16_and_32(heads: int, q_len: int, gen: torch.Generator) -> None:
    """Rows that fill neither 16 nor 32 columns of the transposed consumer: the padding columns
    read zero Q and are never stored."""
    seqlens = ragged_seqlens(gen, q_len, 64)
    q, paged, kv_scale = _case(gen, seqlens, heads, q_len, 64)
    _check(q, paged, kv_scale, what=f"rows={heads * q_len} seqlens={seqlens}")


@pytest.mark.parametrize(
    "q_len,heads,seqlens", [(1, 16, [33000, 17]), (2, 16, [40000, 3]), (4, 16, [65536]), (2, 128, [9000, 1])]
)
def test_long_sequences_are_split_over_the_sms(q_len: int, heads: int, seqlens: list[int], gen: torch.Generator) -> None:
    q, paged, kv_scale = _case(gen, seqlens, heads, q_len, 64)
    _check(q, paged, kv_scale, what=f"seqlens={seqlens}")


@pytest.mark.parametrize("q_len", [1, 2])
@pytest.mark.parametrize("q_mag", [3e4, 1e-5])
def test_query_magnitudes_outside_f16_comfort(q_mag: float, q_len: int, gen: torch.Generator) -> None:
    """Q is f16 inside the kernel, scaled by a power of two per CTA: |q| of 3e4 (f16 overflows at
    65504 once multiplied by anything) and 1e-5 (f16 subnormal) must both come out right, and an
    all-zero row next to them must not poison the scale."""
    q, paged, kv_scale = _case(gen, [300, 1000], 16, q_len, 64, q_mag=q_mag, kv_scale=1.0)
    q[0, 0, 0] = 0.0
    _check(q, paged, kv_scale, what=f"q_mag={q_mag}")


def test_kv_scale_is_read_from_the_device_each_call(gen: torch.Generator) -> None:
    q, paged, kv_scale = _case(gen, [500, 64], 16, 1, 64, kv_scale=0.5)
    a = _check(q, paged, kv_scale, what="scale 0.5")
    kv_scale.fill_(2.0)
    b = _check(q, paged, kv_scale, what="scale 2.0")
    assert not torch.equal(a[0], b[0])


def test_zero_length_and_keyless_rows(gen: torch.Generator) -> None:
    q, paged, kv_scale = _case(gen, [0, 3, 1, 129], 16, 4, 64)
    out, lse = _check(q, paged, kv_scale, what="zero length")
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


def test_many_ragged_sequences(gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    seqlens = [rng.randrange(1, 3000) for _ in range(200)]
    q, paged, kv_scale = _case(gen, seqlens, 16, 1, 64)
    _check(q, paged, kv_scale, what="200 sequences")


def test_fp8_equals_the_bf16_kernel_on_the_widened_cache(gen: torch.Generator) -> None:
    """The same codes widened to bf16 (exact) through the bf16 kernel: both round P and the output
    once, so they agree far more tightly than either does with the tolerance."""
    q, paged, kv_scale = _case(gen, [1500, 90], 32, 2, 64, kv_scale=1.0)
    out8, lse8 = _decode(q, paged, kv_scale)
    wide = paged.kv_cache.to(torch.bfloat16)
    out16, lse16 = torch.ops.tokenspeed.mla_decode(q, wide, paged.block_table, paged.cache_seqlens, SCALE, True, DV, None)
    assert (out8.float() - out16.float()).abs().max() < 2e-2
    assert (lse8 - lse16).abs().max() < 1e-3


def test_cuda_graph_replay_equals_eager_bitwise(gen: torch.Generator) -> None:
    q, paged, kv_scale = _case(gen, [3000, 900, 4100, 5], 16, 2, 64)
    kv, table, lens = paged.kv_cache, paged.block_table, paged.cache_seqlens

    def call():
        return torch.ops.tokenspeed.mla_decode(q, kv, table, lens, SCALE, True, DV, kv_scale)

    graph, captured = capture_graph(call)
    q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
    lens.copy_(torch.tensor([1500, 850, 64, 2], dtype=torch.int32))
    kv_scale.fill_(0.3)
    graph.replay()
    torch.cuda.synchronize()
    fresh = call()
    assert torch.equal(captured[0], fresh[0]) and torch.equal(captured[1], fresh[1])
    ref_out, _ = _reference(q, paged, kv_scale)
    assert_close(captured[0], ref_out, "attention", F8, "replayed out")


def test_opcheck_cuda(gen: torch.Generator) -> None:
    q, paged, kv_scale = _case(gen, [70, 3], 16, 2, 64)
    # torch lacks the fp8 arithmetic opcheck's schema test needs (see test_mla_decode_fp8.py)
    torch.library.opcheck(torch.ops.tokenspeed.mla_decode.default,
                          (q, paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, True, DV, kv_scale),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip


@pytest.mark.parametrize(
    "change,pattern",
    [
        ("no_scale", r"kv_cache is float8_e4m3fn, so kv_scale \(float32 \[1\]\) is required"),
        ("cpu_scale", r"kv_scale"),
        ("fp16_q", r"q must be bfloat16 and kv_cache bfloat16 or float8_e4m3fn, got Half and Float8_e4m3fn.*registry"),
        ("e5m2", r"kv_cache dtype \(Float8_e5m2\) must equal q dtype"),
    ],
)
def test_rejects_bad_fp8_input(change: str, pattern: str, gen: torch.Generator) -> None:
    q, paged, kv_scale = _case(gen, [40], 16, 1, 64)
    kv = paged.kv_cache
    scale: torch.Tensor | None = kv_scale
    if change == "no_scale":
        scale = None
    elif change == "cpu_scale":
        scale = kv_scale.cpu()
    elif change == "fp16_q":
        q = q.to(torch.float16)
    elif change == "e5m2":
        kv = kv.float().nan_to_num().to(torch.float8_e5m2)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.tokenspeed.mla_decode(q, kv, paged.block_table, paged.cache_seqlens, SCALE, True, DV, scale)
