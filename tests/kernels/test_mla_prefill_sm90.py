"""The Hopper MLA prefill kernel (torch.ops.tokenspeed.mla_prefill on CUDA, backend cuda_sm90).

CPU: the host model of the kernel (tests/kernels/mla_prefill_sm90_model.py) against the fp64
reference — its schedule, masks and online softmax — and a simulation of its barrier protocol
under random interleavings (deadlocks, stale or overwritten shared-memory stages).
GPU (``-m gpu``, Hopper only): the kernel itself against a reference computed in fp64 on the
GPU, on ragged batches with lengths 1..300 that are not multiples of the tiles, causal and not,
queries shorter and longer than the keys, NaN rows past the last sequence (a read that is not
masked, or a V row that is not zeroed, shows up as NaN), the merge of two halves, CUDA-graph
replay, opcheck. Run the GPU part under a timeout: a protocol error hangs instead of failing.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.kernels import mla_prefill_sm90_model as model
from tokenspeed_kernels.reference import mla_prefill_ref
from tokenspeed_kernels.testing import assert_close
from tokenspeed_kernels.testing.graphs import capture_graph

DQK, DV = 192, 128
SCALE = DQK**-0.5


def cu_of(lens: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_inputs(pairs: list[tuple[int, int]], heads: int, kv_heads: int, gen: torch.Generator, device: str = "cpu",
                poison: int = 3, q_scale: float = 1.0) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Packed bf16 q, k, v and cu_seqlens for (lq, lk) pairs; ``poison`` NaN rows follow the last
    sequence in q, k and v. They lie inside the tensors but past cu_seqlens[-1] (the CPU op and
    TOKENSPEED_DEBUG_CHECKS=1 refuse that; the kernel does not check without a sync), so the
    kernel's TMA does read them for the last partial tile: any of them in a result is a bug."""
    tq, tk = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    q = (torch.randn(tq + poison, heads, DQK, generator=gen) * q_scale).to(torch.bfloat16)
    k = torch.randn(tk + poison, kv_heads, DQK, generator=gen).to(torch.bfloat16)
    v = torch.randn(tk + poison, kv_heads, DV, generator=gen).to(torch.bfloat16)
    for t in (q, k, v):
        t[t.shape[0] - poison :] = float("nan")
    cq, ck = cu_of([p[0] for p in pairs]), cu_of([p[1] for p in pairs])
    return tuple(t.to(device) for t in (q, k, v, cq, ck))


def ragged_pairs(rng: random.Random, n: int = 5, top: int = 300) -> list[tuple[int, int]]:
    """(lq, lk) with lengths 1..top, mostly lk >= lq (a chunk over a cached prefix), one lq == lk,
    one single query, and boundary lengths around the 128-row / 128-key tiles."""
    pairs = [(1, rng.randrange(1, top)), (lq := rng.randrange(2, top), lq)]
    pairs += [(x, x + rng.randrange(0, 200)) for x in (rng.randrange(1, top) for _ in range(n - 2))]
    pairs += [(rng.choice([127, 128, 129]), rng.choice([128, 255, 256, 257]))]
    rng.shuffle(pairs)
    return pairs


# ================================================================== CPU: the host model
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])
def test_model_matches_fp64_reference(causal: bool, heads: int, kv_heads: int, gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    pairs = ragged_pairs(rng) + [(0, 0), (5, 0), (40, 17), (0, 9)]  # empty, no keys, q longer than kv
    q, k, v, cq, ck = make_inputs(pairs, heads, kv_heads, gen)
    out, lse, stats = model.model_forward(q, k, v, cq, ck, SCALE, causal, grid=rng.randrange(1, 20))
    ref_out, ref_lse = mla_prefill_ref(q.double(), k.double(), v.double(), cq, ck, 0, 0, SCALE, causal)
    tq = int(cq[-1])
    what = f"pairs={pairs} causal={causal}"
    assert_close(out[:tq], ref_out[:tq], "attention", torch.bfloat16, f"model out {what}")
    assert_close(lse[:tq], ref_lse[:tq], "lse", torch.bfloat16, f"model lse {what}")
    assert stats.masked_tiles > 0


def test_model_rescales_and_stays_exact_with_large_scores(gen: torch.Generator) -> None:
    """Scores spread over hundreds of log2 units, growing with the key index, so row maxima keep
    passing the rescale threshold from tile to tile (key tiles are visited last to first)."""
    pairs = [(200, 700), (37, 300)]
    q, k, v, cq, ck = make_inputs(pairs, 2, 2, gen, q_scale=3.0)
    k[: int(ck[-1])] *= torch.linspace(3.0, 0.2, int(ck[-1])).to(torch.bfloat16)[:, None, None]
    out, lse, stats = model.model_forward(q, k, v, cq, ck, 0.3, True, grid=3)
    ref_out, ref_lse = mla_prefill_ref(q.double(), k.double(), v.double(), cq, ck, 0, 0, 0.3, True)
    tq = int(cq[-1])
    assert stats.rescales > 50
    assert_close(out[:tq], ref_out[:tq], "attention", torch.bfloat16, "model out")
    assert_close(lse[:tq], ref_lse[:tq], "lse", torch.bfloat16, "model lse")


@pytest.mark.parametrize("grid", [1, 5, 132])
def test_schedule_covers_every_tile_once_heaviest_first(grid: int) -> None:
    lqs, lks = [0, 1, 300, 128, 129, 1000, 7], [0, 40, 300, 5000, 129, 90000, 0]
    cq, ck = cu_of(lqs).tolist(), cu_of(lks).tolist()
    heads = 24
    seen: dict[tuple[int, int, int], int] = {}
    for cta in range(grid):
        for w in model.schedule(cq, ck, heads, 1, DQK, 31 << 20, cta, grid):
            key = (w.b, w.h, w.m_block)
            assert key not in seen, f"tile {key} scheduled twice"
            seen[key] = cta
            assert (w.q_start, w.lq, w.k_start, w.lk) == (cq[w.b], lqs[w.b], ck[w.b], lks[w.b])
    expected = {(b, h, m) for b, lq in enumerate(lqs) for h in range(heads) for m in range(model.m_blocks(lq))}
    assert set(seen) == expected
    # One CTA's tiles of one (sequence, head) come heaviest (last) m-block first.
    for cta in range(grid):
        order = [(w.b, w.h, w.m_block) for w in model.schedule(cq, ck, heads, 1, DQK, 31 << 20, cta, grid)]
        for (b0, h0, m0), (b1, h1, m1) in zip(order, order[1:], strict=False):
            if (b0, h0) == (b1, h1):
                assert m1 < m0


def test_schedule_l2_sections() -> None:
    """Long keys: one head per section (its K/V alone fill the budget); short keys: 16 heads."""
    assert model.section_heads(81920, 16, 1, DQK, 31 << 20) == 1
    assert model.section_heads(8192, 128, 1, DQK, 31 << 20) == 4  # 5.2 MB per head
    assert model.section_heads(300, 128, 1, DQK, 31 << 20) == 16
    assert model.section_heads(300, 8, 1, DQK, 31 << 20) == 8


def test_causal_tiles_above_the_diagonal_are_never_loaded() -> None:
    """Key tiles per work tile: exactly those a row of the tile can see (bottom-right causal)."""
    lq, lk = 1000, 3000
    loaded = sum(
        model.kv_tiles_of(model.kv_end_of(lq, lk, m * 128, True)) for m in range(model.m_blocks(lq))
    )  # fmt: skip
    needed = sum(math.ceil(min(lk, lk - lq + min(m * 128 + 127, lq - 1) + 1) / 128) for m in range(model.m_blocks(lq)))
    assert loaded == needed
    assert model.kv_unmasked_tiles(lq, lk, 0, True) == (lk - lq + 1) // 128
    assert model.kv_tiles_of(model.kv_end_of(40, 17, 0, True)) == 1  # rows 23..39 see keys
    assert model.kv_tiles_of(model.kv_end_of(400, 17, 0, True)) == 0  # no row of m-block 0 sees a key


def test_pipeline_protocol_under_random_interleavings() -> None:
    rng = random.Random(1234)
    for seed in range(150):
        tiles = [(rng.choice([0, 1, 1, 2, 3, 4, 9]), rng.randint(0, 1)) for _ in range(rng.randint(1, 7))]
        counters = model.simulate_pipeline(tiles, seed)
        assert counters["wgmma_groups"] == 2 * sum(2 * t for t, _ in tiles)


@pytest.mark.parametrize("fault", model.FAULTS)
def test_pipeline_simulation_catches_planted_faults(fault: str) -> None:
    rng = random.Random(99)
    caught = 0
    for seed in range(60):
        tiles = [(rng.choice([1, 2, 3, 5]), rng.randint(0, 1)) for _ in range(rng.randint(2, 6))]
        try:
            model.simulate_pipeline(tiles, seed, fault=fault)
        except AssertionError:  # Deadlock is an AssertionError too
            caught += 1
    assert caught > 0, f"planted fault {fault!r} went unnoticed in 60 interleavings"


def test_registration() -> None:
    import tokenspeed_kernels
    from tokenspeed_kernels import registry
    from tokenspeed_kernels.registry import A100, B200, H100

    k = registry.select("mla_prefill", H100, torch.bfloat16, head_dim_qk=192, head_dim_v=128, verified_only=True)
    assert k.backend == ("cuda_sm90" if tokenspeed_kernels.build_info()["cuda"] else "triton")  # verified on an H100
    with registry.use_backend("cuda_sm90", "mla_prefill"):
        if tokenspeed_kernels.build_info()["cuda"]:
            assert registry.select("mla_prefill", H100, torch.bfloat16, head_dim_qk=192, head_dim_v=128).backend == "cuda_sm90"
        for dev, dtype, dims in ((B200, torch.bfloat16, (192, 128)), (A100, torch.bfloat16, (192, 128)),
                                 (H100, torch.float16, (192, 128)), (H100, torch.bfloat16, (128, 128))):  # fmt: skip
            with pytest.raises(registry.NoKernelError):
                registry.select("mla_prefill", dev, dtype, head_dim_qk=dims[0], head_dim_v=dims[1])


# ================================================================== GPU: the kernel
Pair = tuple[torch.Tensor, torch.Tensor]


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cq: torch.Tensor, ck: torch.Tensor, causal: bool = True,
             scale: float = SCALE) -> Pair:  # fmt: skip
    """The op with max_seqlen_q / max_seqlen_k taken from the lengths (a host sync; fine in tests)."""
    mq = int((cq[1:] - cq[:-1]).max()) if cq.numel() > 1 else 0
    mk = int((ck[1:] - ck[:-1]).max()) if ck.numel() > 1 else 0
    return torch.ops.tokenspeed.mla_prefill(q, k, v, cq, ck, mq, mk, scale, causal)


def gpu_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cq: torch.Tensor, ck: torch.Tensor, scale: float,
                  causal: bool) -> Pair:  # fmt: skip
    """fp64 on the GPU, one sequence at a time, heads in chunks (the CPU reference is too slow
    for 128 heads x thousands of keys)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    out = torch.zeros(q.shape[0], heads, DV, dtype=torch.float64, device=q.device)
    lse = torch.full((q.shape[0], heads), -math.inf, dtype=torch.float64, device=q.device)
    cq_l, ck_l = cq.tolist(), ck.tolist()
    for b in range(len(cq_l) - 1):
        q0, q1, k0, k1 = cq_l[b], cq_l[b + 1], ck_l[b], ck_l[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        chunk = max(1, (1 << 27) // (lq * lk))
        for h0 in range(0, heads, chunk):
            hs = torch.arange(h0, min(heads, h0 + chunk), device=q.device)
            qb = q[q0:q1, hs].double().transpose(0, 1)
            kb = k[k0:k1, hs // group].double().transpose(0, 1)
            vb = v[k0:k1, hs // group].double().transpose(0, 1)
            s = qb @ kb.transpose(1, 2) * scale
            if causal:
                vis = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + lk - lq
                s = s.masked_fill(~vis, -math.inf)
            row = torch.logsumexp(s, dim=-1, keepdim=True)
            p = torch.where(torch.isfinite(row), torch.exp(s - row), torch.zeros_like(s))
            out[q0:q1, h0 : h0 + len(hs)] = (p @ vb).transpose(0, 1)
            lse[q0:q1, h0 : h0 + len(hs)] = row.squeeze(-1).transpose(0, 1)
    return out, lse


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cq: torch.Tensor, ck: torch.Tensor, causal: bool = True,
           scale: float = SCALE, what: str = "") -> Pair:  # fmt: skip
    out, lse = _prefill(q, k, v, cq, ck, causal, scale)
    torch.cuda.synchronize()
    ref_out, ref_lse = gpu_reference(q, k, v, cq, ck, scale, causal)
    tq = int(cq[-1])
    assert out.shape == (q.shape[0], q.shape[1], DV) and out.dtype == torch.bfloat16
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert_close(out[:tq], ref_out[:tq], "attention", torch.bfloat16, f"out {what}")
    assert_close(lse[:tq], ref_lse[:tq], "lse", torch.bfloat16, f"lse {what}")
    return out, lse


@pytest.mark.gpu
@pytest.mark.sm90
def test_smoke_one_tile(gen: torch.Generator) -> None:
    """One sequence of 1 query and 1 key, then one full 128 x 128 tile: the first thing to run."""
    for pairs in ([(1, 1)], [(128, 128)]):
        q, k, v, cq, ck = make_inputs(pairs, 16, 16, gen, "cuda", poison=0)
        _check(q, k, v, cq, ck, True, what=f"{pairs}")


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [16, 128])
def test_matches_reference_ragged(heads: int, causal: bool, gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    pairs = ragged_pairs(rng, 6)
    q, k, v, cq, ck = make_inputs(pairs, heads, heads, gen, "cuda")
    _check(q, k, v, cq, ck, causal, what=f"heads={heads} pairs={pairs}")


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("heads", [16, 32])
def test_chunk_over_long_prefix(heads: int, gen: torch.Generator) -> None:
    """Chunked prefill: short query chunks over long cached prefixes, plus a full causal prompt."""
    pairs = [(1024, 10240), (300, 5000 + 77), (2048, 2048), (1, 3000)]
    q, k, v, cq, ck = make_inputs(pairs, heads, heads, gen, "cuda")
    _check(q, k, v, cq, ck, True, what=f"{pairs}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_queries_longer_than_keys_and_empty_sequences(gen: torch.Generator) -> None:
    pairs = [(40, 17), (0, 0), (5, 0), (0, 9), (300, 129), (3, 3)]
    q, k, v, cq, ck = make_inputs(pairs, 16, 16, gen, "cuda")
    out, lse = _check(q, k, v, cq, ck, True, what=f"{pairs}")
    assert (out[:23] == 0).all() and torch.isneginf(lse[:23]).all()  # rows 0..22 of (40, 17) see nothing
    assert (out[40:45] == 0).all() and torch.isneginf(lse[40:45]).all()  # (5, 0): no keys
    _check(q, k, v, cq, ck, False, what=f"non-causal {pairs}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_grouped_heads(gen: torch.Generator) -> None:
    q, k, v, cq, ck = make_inputs([(200, 900), (130, 130)], 32, 8, gen, "cuda")
    _check(q, k, v, cq, ck, True, what="32 heads over 8 kv heads")


@pytest.mark.gpu
@pytest.mark.sm90
def test_strided_inputs(gen: torch.Generator) -> None:
    """q / k views into wider buffers (head stride 256, token stride 16 x 256), v non-contiguous."""
    pairs = [(100, 300), (7, 7)]
    q, k, v, cq, ck = make_inputs(pairs, 16, 16, gen, "cuda", poison=0)
    qw = torch.zeros(q.shape[0], 16, 256, dtype=q.dtype, device="cuda")
    kw = torch.zeros(k.shape[0], 16, 256, dtype=k.dtype, device="cuda")
    qw[..., :DQK], kw[..., :DQK] = q, k
    vt = v.transpose(0, 1).contiguous().transpose(0, 1)  # [tokens, heads, 128] with head-major storage
    _check(qw[..., :DQK], kw[..., :DQK], vt, cq, ck, True, what="strided")


@pytest.mark.gpu
@pytest.mark.sm90
def test_large_scores_exercise_the_conditional_rescale(gen: torch.Generator) -> None:
    pairs = [(600, 1900), (129, 700)]
    q, k, v, cq, ck = make_inputs(pairs, 16, 16, gen, "cuda", q_scale=3.0)
    k[: int(ck[-1])] *= torch.linspace(3.0, 0.2, int(ck[-1]), device="cuda").to(torch.bfloat16)[:, None, None]
    _check(q, k, v, cq, ck, True, scale=0.3, what="large scores")


@pytest.mark.gpu
@pytest.mark.sm90
def test_merge_of_two_halves_equals_the_whole(gen: torch.Generator) -> None:
    """Chunked prefill as the engine runs it: the chunk over its cached prefix (non-causal) merged
    with the chunk over itself (causal) equals causal attention over prefix + chunk."""
    import tokenspeed_kernels as tk

    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    chunks = [rng.randrange(1, 300) for _ in range(3)]
    prefixes = [rng.randrange(1, 600) for _ in range(2)] + [0]  # a sequence without a prefix
    pairs = [(c, c + p) for c, p in zip(chunks, prefixes, strict=True)]
    q, k, v, cq, ck = make_inputs(pairs, 16, 16, gen, "cuda", poison=0)
    whole = _prefill(q, k, v, cq, ck, True)
    pre = torch.cat([torch.arange(int(ck[b]), int(ck[b]) + p) for b, p in enumerate(prefixes)]).cuda()
    new = torch.cat([torch.arange(int(ck[b]) + p, int(ck[b + 1])) for b, p in enumerate(prefixes)]).cuda()
    a = _prefill(q, k[pre], v[pre], cq, cu_of(prefixes, "cuda"), False)
    b = _prefill(q, k[new], v[new], cq, cu_of(chunks, "cuda"), True)
    out, lse = tk.merge_attn_states(a[0], a[1], b[0], b[1])
    assert_close(out, whole[0].double(), "attention", torch.bfloat16, f"merged out {pairs}")
    assert_close(lse, whole[1].double(), "lse", torch.bfloat16, f"merged lse {pairs}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_matches_cpu_implementation(gen: torch.Generator) -> None:
    q, k, v, cq, ck = make_inputs([(130, 400), (3, 3)], 16, 16, gen, "cuda", poison=0)
    out, lse = _prefill(q, k, v, cq, ck, True)
    cpu_out, cpu_lse = _prefill(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), True)
    assert_close(out, cpu_out.double(), "attention", torch.bfloat16, "vs CPU")
    assert_close(lse, cpu_lse.double(), "lse", torch.bfloat16, "lse vs CPU")


@pytest.mark.gpu
@pytest.mark.sm90
def test_every_output_element_is_written_and_deterministic(gen: torch.Generator) -> None:
    q, k, v, cq, ck = make_inputs([(900, 4000), (1, 1), (0, 5), (257, 257)], 64, 64, gen, "cuda", poison=0)
    for _ in range(2):
        poison = torch.full((q.shape[0] * 64 * DV * 2,), float("nan"), device="cuda")  # dirty the allocator's blocks
        del poison
        a = _prefill(q, k, v, cq, ck, True)
        assert not torch.isnan(a[0]).any() and not torch.isnan(a[1]).any()
    b = _prefill(q, k, v, cq, ck, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@pytest.mark.sm90
def test_cuda_graph_replay_equals_eager_bitwise(gen: torch.Generator) -> None:
    """The schedule is walked on the device: a captured graph follows new lengths (within the
    max_seqlen bounds the grid was sized with)."""
    pairs = [(300, 900), (17, 17), (512, 2000)]
    q, k, v, cq, ck = make_inputs(pairs, 16, 16, gen, "cuda", poison=0)
    args = (cq, ck, 512, 2000, SCALE, True)
    eager_before = torch.ops.tokenspeed.mla_prefill(q, k, v, *args)
    graph, captured = capture_graph(lambda: torch.ops.tokenspeed.mla_prefill(q, k, v, *args))
    cq.copy_(torch.tensor([0, 100, 350, 829], dtype=torch.int32))
    ck.copy_(torch.tensor([0, 1000, 1250, 2900], dtype=torch.int32))
    q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    fresh = torch.ops.tokenspeed.mla_prefill(q, k, v, *args)
    assert torch.equal(captured[0][:829], fresh[0][:829]) and torch.equal(captured[1][:829], fresh[1][:829])
    assert not torch.equal(captured[0][:829], eager_before[0][:829])
    ref_out, ref_lse = gpu_reference(q, k, v, cq, ck, SCALE, True)
    assert_close(captured[0][:829], ref_out[:829], "attention", torch.bfloat16, "replayed out")
    assert_close(captured[1][:829], ref_lse[:829], "lse", torch.bfloat16, "replayed lse")


@pytest.mark.gpu
@pytest.mark.sm90
def test_opcheck(gen: torch.Generator) -> None:
    q, k, v, cq, ck = make_inputs([(70, 200), (3, 3)], 16, 16, gen, "cuda", poison=0)
    torch.library.opcheck(torch.ops.tokenspeed.mla_prefill.default, (q, k, v, cq, ck, 70, 200, SCALE, True))


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize(
    "change,pattern",
    [
        ("fp16", r"must be bfloat16, got Half.*registry"),
        ("head_dim_qk", r"head_dim_qk \(q.shape\[2\]\) must be 192.*registry"),
        ("head_dim_v", r"head_dim_v \(v.shape\[2\]\) must be 128, got 64.*registry"),
        ("scale", r"softmax_scale must be > 0.*registry"),
        ("misaligned_q", r"q's rows must be 16-byte aligned"),
        ("kv_heads", r"must be a multiple of kv_heads"),
    ],
)
def test_rejects_unsupported_input(change: str, pattern: str, gen: torch.Generator) -> None:
    dqk, dv, dtype, heads, kv_heads, scale = DQK, DV, torch.bfloat16, 16, 16, SCALE
    if change == "fp16":
        dtype = torch.float16
    elif change == "head_dim_qk":
        dqk = 128
    elif change == "head_dim_v":
        dv = 64
    elif change == "scale":
        scale = -0.1
    elif change == "kv_heads":
        kv_heads = 3
    q = torch.randn(10, heads, dqk + (4 if change == "misaligned_q" else 0), generator=gen).to(dtype).cuda()
    if change == "misaligned_q":
        q = q[..., 4:]
    k = torch.randn(10, kv_heads, dqk, generator=gen).to(dtype).cuda()
    v = torch.randn(10, kv_heads, dv, generator=gen).to(dtype).cuda()
    cu = torch.tensor([0, 10], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.tokenspeed.mla_prefill(q, k, v, cu, cu, 10, 10, scale, True)


@pytest.mark.gpu
@pytest.mark.sm90
def test_empty_inputs() -> None:
    z = torch.empty(0, 16, DQK, dtype=torch.bfloat16, device="cuda")
    zv = torch.empty(0, 16, DV, dtype=torch.bfloat16, device="cuda")
    cu = torch.zeros(3, dtype=torch.int32, device="cuda")
    out, lse = torch.ops.tokenspeed.mla_prefill(z, z, zv, cu, cu, 0, 0, SCALE, True)
    assert out.shape == (0, 16, DV) and lse.shape == (0, 16)
    q = torch.randn(4, 16, DQK, device="cuda").to(torch.bfloat16)
    cq, ck = torch.tensor([0, 4], dtype=torch.int32, device="cuda"), torch.tensor([0, 0], dtype=torch.int32, device="cuda")
    out, lse = torch.ops.tokenspeed.mla_prefill(q, z, zv, cq, ck, 4, 0, SCALE, True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    # no query heads: empty outputs, as the reference (the TMA encoder refuses a 0-size dim)
    q0 = torch.empty(4, 0, DQK, dtype=torch.bfloat16, device="cuda")
    k1 = torch.randn(4, 1, DQK, device="cuda").to(torch.bfloat16)
    v1 = torch.randn(4, 1, DV, device="cuda").to(torch.bfloat16)
    out, lse = torch.ops.tokenspeed.mla_prefill(q0, k1, v1, cq, cq, 4, 4, SCALE, True)
    assert out.shape == (4, 0, DV) and lse.shape == (4, 0)
