"""The Hopper MLA decode kernel (torch.ops.tokenspeed.mla_decode on CUDA) against fp64 references.

Every case builds its cache with make_paged_kv: pages in random order, NaN in every slot
and page the kernel must not read (tails of last pages, spare pages, the pages unused
block-table entries point at), so an out-of-range read or a 0 * NaN in P V shows up as
NaN. Skipped cleanly without a Hopper GPU.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tokenspeed_kernels.reference import mla_decode_ref
from tokenspeed_kernels.testing import assert_close, make_paged_kv, ragged_seqlens
from tokenspeed_kernels.testing.graphs import capture_graph

pytestmark = [pytest.mark.gpu, pytest.mark.sm90]

DIM, DV = 576, 512
SCALE = 192**-0.5  # DeepSeek-V3: qk_head_dim ** -0.5 (before the YaRN factor)


@pytest.fixture(autouse=True, params=["lockstep", "seesaw"])
def schedule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every case under both consumer schedules (TOKENSPEED_MLA_DECODE_SCHEDULE, read per call)."""
    monkeypatch.setenv("TOKENSPEED_MLA_DECODE_SCHEDULE", request.param)
    return request.param


def _decode(q, paged, scale=SCALE, causal=True):
    return torch.ops.tokenspeed.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, scale, causal, DV, None)


def _check(q, paged, scale=SCALE, causal=True, what=""):
    out, lse = _decode(q, paged, scale, causal)
    torch.cuda.synchronize()
    ref_out, ref_lse = mla_decode_ref(
        q.double(), paged.kv_cache.double(), paged.block_table, paged.cache_seqlens, scale, causal, DV
    )
    assert out.shape == ref_out.shape and out.dtype == torch.bfloat16
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert_close(out, ref_out, "attention", torch.bfloat16, f"out {what}")
    assert_close(lse, ref_lse, "lse", torch.bfloat16, f"lse {what}")
    return out, lse


def _case(gen, seqlens, heads, q_len, page_size, q_scale=1.0):
    paged = make_paged_kv(seqlens, page_size, DIM, torch.bfloat16, device="cuda", generator=gen)
    q = (torch.randn(len(seqlens), q_len, heads, DIM, generator=gen) * q_scale).to(torch.bfloat16).cuda()
    return q, paged


@pytest.mark.parametrize("q_len", [1, 2, 4, 8])
@pytest.mark.parametrize("heads", [16, 32, 64, 128])
def test_matches_reference_page64(heads: int, q_len: int, gen: torch.Generator) -> None:
    seqlens = ragged_seqlens(gen, q_len, 64)
    q, paged = _case(gen, seqlens, heads, q_len, 64)
    _check(q, paged, what=f"heads={heads} q_len={q_len} seqlens={seqlens}")


@pytest.mark.parametrize("page_size", [16, 32, 128, 256])
@pytest.mark.parametrize("heads,q_len", [(16, 1), (16, 4), (128, 2)])
def test_other_page_sizes(page_size: int, heads: int, q_len: int, gen: torch.Generator) -> None:
    seqlens = ragged_seqlens(gen, q_len, page_size)
    q, paged = _case(gen, seqlens, heads, q_len, page_size)
    _check(q, paged, what=f"page_size={page_size} seqlens={seqlens}")


@pytest.mark.parametrize("heads,q_len", [(16, 1), (32, 4), (128, 1)])
def test_non_causal(heads: int, q_len: int, gen: torch.Generator) -> None:
    q, paged = _case(gen, [5, 64, 700], heads, q_len, 64)
    _check(q, paged, causal=False)


@pytest.mark.parametrize("heads", [24, 40, 100])
def test_head_counts_that_do_not_divide_64(heads: int, gen: torch.Generator) -> None:
    """Rows = q_len x heads fold across 64-row blocks at arbitrary boundaries."""
    q, paged = _case(gen, [300, 1, 129], heads, 3, 64)
    _check(q, paged)


@pytest.mark.parametrize("q_len", [1, 4])
def test_batch1_long_context_is_split_over_the_sms(q_len: int, gen: torch.Generator) -> None:
    """64K keys on one sequence: every SM takes a slice, the combine kernel merges them."""
    q, paged = _case(gen, [65536 - 7], 16, q_len, 64)
    _check(q, paged, what="64K")


@pytest.mark.parametrize("min_split", [1, 2, 3, 64])
def test_every_smallest_split_size(min_split: int, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """TOKENSPEED_MLA_DECODE_MIN_SPLIT changes how many CTAs share a sequence (1: a tile each,
    64: few splits), not the result beyond rounding; ragged short and long sequences."""
    monkeypatch.setenv("TOKENSPEED_MLA_DECODE_MIN_SPLIT", str(min_split))
    q, paged = _case(gen, [1, 65, 700, 4001, 130, 9000], 16, 2, 64)
    _check(q, paged, what=f"min_split={min_split}")


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("heads,q_len", [(16, 1), (64, 1), (128, 2)])
def test_a_batch_just_over_an_even_share(
    window: int, heads: int, q_len: int, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As many equal sequences as slots less a few, each a little over the even share C0: the
    even split (window 1) splits every one, a wider window gives each its own slot (no partials)."""
    monkeypatch.setenv("TOKENSPEED_MLA_DECODE_PLAN_WINDOW", str(window))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    slots = max(1, sms // math.ceil(heads * q_len / 64))
    batch = max(1, slots - 4)
    q, paged = _case(gen, [2048 - 5] * (batch - 1) + [1500], heads, q_len, 64)
    _check(q, paged, what=f"window={window} batch={batch}")


BAD_SETTINGS = (
    [("TOKENSPEED_MLA_DECODE_MIN_SPLIT", v, r"TOKENSPEED_MLA_DECODE_MIN_SPLIT must be in \[1, 64\]") for v in ("0", "65", "x")]
    + [
        ("TOKENSPEED_MLA_DECODE_PLAN_WINDOW", v, r"TOKENSPEED_MLA_DECODE_PLAN_WINDOW must be in \[1, 8\]")
        for v in ("0", "9", "x")
    ]
    + [("TOKENSPEED_MLA_DECODE_SCHEDULE", "pingpong", r"TOKENSPEED_MLA_DECODE_SCHEDULE must be lockstep or seesaw")]
)


@pytest.mark.parametrize("name,value,pattern", BAD_SETTINGS)
def test_rejects_a_bad_setting(
    name: str, value: str, pattern: str, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each decode knob (read per call) names itself and its range when its value is wrong."""
    monkeypatch.setenv(name, value)
    q, paged = _case(gen, [100], 16, 1, 64)
    with pytest.raises(RuntimeError, match=pattern):
        _decode(q, paged)


def test_many_ragged_sequences(gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    seqlens = [rng.choice([1, 2, 64, rng.randrange(1, 300), rng.randrange(300, 4000)]) for _ in range(96)]
    q, paged = _case(gen, seqlens, 16, 2, 64)
    _check(q, paged, what="96 sequences")


def test_large_scores_exercise_the_conditional_rescale(gen: torch.Generator) -> None:
    """Scores spread over hundreds of log2 units and grow along each sequence (pages
    scaled by their logical index), so each row's max passes the rescale threshold
    again and again; a partial tile and a split over several CTAs are included."""
    seqlens = [1500, 777, 4100]
    q, paged = _case(gen, seqlens, 32, 2, 64, q_scale=2.0)
    for b, n in enumerate(seqlens):
        pages = -(-n // 64)
        for p in range(pages):
            paged.kv_cache[int(paged.block_table[b, p])] *= 0.2 + 2.8 * p / pages  # NaN stays NaN
    _check(q, paged, scale=0.3)


def test_rows_without_visible_keys(gen: torch.Generator) -> None:
    """Causal q_len 8 over fewer than 8 keys: the first rows see nothing (out 0, lse -inf)."""
    q, paged = _case(gen, [3, 1, 70], 16, 8, 64)
    out, lse = _check(q, paged)
    assert (out[0, :5] == 0).all() and torch.isneginf(lse[0, :5]).all()
    assert (out[1, :7] == 0).all() and torch.isneginf(lse[1, :7]).all()


def test_zero_length_sequences(gen: torch.Generator) -> None:
    q, paged = _case(gen, [0, 130, 0], 16, 2, 64)
    out, lse = _check(q, paged)
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[2]).all()
    q, paged = _case(gen, [0, 0], 32, 1, 64)
    out, lse = _decode(q, paged)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_every_output_element_is_written(gen: torch.Generator) -> None:
    """Leave NaN in the blocks the caching allocator will hand out for out / lse."""
    q, paged = _case(gen, [900, 1, 0, 4000], 64, 2, 64)
    for _ in range(3):
        poison = [torch.full_like(q[..., :DV], float("nan")), torch.full(q.shape[:3], float("nan"), device="cuda")]
        del poison
        out, lse = _decode(q, paged)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_unused_block_table_entries_are_never_read(gen: torch.Generator) -> None:
    """Entries past each sequence's pages hold indices far outside the cache."""
    q, paged = _case(gen, [100, 64, 1], 16, 1, 64)
    table = paged.block_table.clone()
    for b, n in enumerate(paged.cache_seqlens.tolist()):
        table[b, -(-n // 64) :] = -(2**30) if b % 2 else 2**30
    paged.block_table = table
    _check(q, paged)


def test_strided_q(gen: torch.Generator) -> None:
    wide = torch.randn(3, 2, 16, 640, generator=gen).to(torch.bfloat16).cuda()
    q = wide[..., :DIM]  # head stride 640: rows are 16-byte aligned but not packed
    paged = make_paged_kv([200, 7, 64], 64, DIM, torch.bfloat16, device="cuda", generator=gen)
    _check(q, paged)


def test_matches_cpu_implementation(gen: torch.Generator) -> None:
    q, paged = _case(gen, [333, 65, 2], 16, 4, 64)
    out, lse = _decode(q, paged)
    cpu_out, cpu_lse = torch.ops.tokenspeed.mla_decode(
        q.cpu(), paged.kv_cache.cpu(), paged.block_table.cpu(), paged.cache_seqlens.cpu(), SCALE, True, DV, None
    )
    assert_close(out, cpu_out.double(), "attention", torch.bfloat16, "vs CPU")
    assert_close(lse, cpu_lse.double(), "lse", torch.bfloat16, "lse vs CPU")


def test_deterministic(gen: torch.Generator) -> None:
    q, paged = _case(gen, [5000, 17, 900], 32, 2, 64)
    a, b = _decode(q, paged), _decode(q, paged)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cuda_graph_replay_equals_eager_bitwise(gen: torch.Generator) -> None:
    """The split plan is computed on the device: a captured graph follows new lengths."""
    heads, q_len = 16, 2
    q, paged = _case(gen, [3000, 64, 1, 777], heads, q_len, 64)
    kv, table, lens = paged.kv_cache, paged.block_table, paged.cache_seqlens
    graph, captured = capture_graph(lambda: torch.ops.tokenspeed.mla_decode(q, kv, table, lens, SCALE, True, DV, None))
    # New queries and new lengths (each within its sequence's pages), written in place.
    q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
    lens.copy_(torch.tensor([2999, 1, 0, 700], dtype=torch.int32))  # no sequence needs a new page
    graph.replay()
    torch.cuda.synchronize()
    fresh = torch.ops.tokenspeed.mla_decode(q, kv, table, lens, SCALE, True, DV, None)
    assert torch.equal(captured[0], fresh[0]) and torch.equal(captured[1], fresh[1])
    ref_out, ref_lse = mla_decode_ref(q.double(), kv.double(), table, lens, SCALE, True, DV)
    assert_close(captured[0], ref_out, "attention", torch.bfloat16, "graph replay")
    assert_close(captured[1], ref_lse, "lse", torch.bfloat16, "graph replay lse")


def test_opcheck_cuda(gen: torch.Generator) -> None:
    q, paged = _case(gen, [70, 3], 16, 2, 64)
    torch.library.opcheck(
        torch.ops.tokenspeed.mla_decode.default,
        (q, paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, True, DV, None),
    )


@pytest.mark.parametrize(
    "change,pattern",
    [
        ("fp16", r"q must be bfloat16 and kv_cache bfloat16 or float8_e4m3fn, got Half and Half.*registry"),
        ("head_dim", r"head_dim \(q.shape\[3\]\) must be 576.*registry"),
        ("head_dim_v", r"head_dim_v must be 512, got 256.*registry"),
        ("q_len", r"q_len \(q.shape\[1\]\) must be in \[1, 8\], got 9.*registry"),
        ("heads", r"heads \(q.shape\[2\]\) must be in \[1, 128\], got 130.*registry"),
        ("page_size", r"page_size \(kv_cache.shape\[1\]\) must be a power of two in \[16, 256\], got 48"),
        ("misaligned_q", r"q's rows must be 16-byte aligned"),
    ],
)
def test_rejects_unsupported_input(change: str, pattern: str, gen: torch.Generator) -> None:
    heads, q_len, page_size, dim, dv = 16, 1, 64, DIM, DV
    dtype = torch.bfloat16
    if change == "fp16":
        dtype = torch.float16
    elif change == "head_dim":
        dim = 640
    elif change == "head_dim_v":
        dv = 256
    elif change == "q_len":
        q_len = 9
    elif change == "heads":
        heads = 130
    elif change == "page_size":
        page_size = 48
    paged = make_paged_kv([40], page_size, dim, dtype, device="cuda", generator=gen)
    q = torch.randn(1, q_len, heads, dim + (4 if change == "misaligned_q" else 0), generator=gen).to(dtype).cuda()
    if change == "misaligned_q":
        q = q[..., 4:]
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.tokenspeed.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, True, dv, None)


def test_empty_batch() -> None:
    q = torch.empty(0, 1, 16, DIM, dtype=torch.bfloat16, device="cuda")
    kv = torch.zeros(2, 64, DIM, dtype=torch.bfloat16, device="cuda")
    table = torch.zeros(0, 1, dtype=torch.int32, device="cuda")
    lens = torch.zeros(0, dtype=torch.int32, device="cuda")
    out, lse = torch.ops.tokenspeed.mla_decode(q, kv, table, lens, SCALE, True, DV, None)
    assert out.shape == (0, 1, 16, DV) and lse.shape == (0, 1, 16)
    assert not math.isnan(float(out.sum()))
