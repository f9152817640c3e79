"""A host model of the sm90 MLA prefill kernel (csrc/mla/prefill/), for tests without a GPU.

It mirrors the kernel's decisions line by line so that they can be checked against the fp64
reference on the CPU:

* the schedule (``mla_prefill_sm90.h``): which CTA takes which (sequence, head, m-block) tile,
  L2 sections, heaviest m-block first;
* the key range of a tile, which key tiles need a mask, the mask itself (bottom-right causal,
  end of sequence), the zeroing of V rows past the sequence;
* the online softmax of one consumer warpgroup: exp2 with the scale folded in, the row max
  taken before scaling, the conditional rescale (threshold 2^8), P rounded to bf16 before P V,
  l summed from the unrounded P, lse = (m + log2 l) ln 2, empty rows -> out 0 / lse -inf;
* the pipeline protocol (``simulate_pipeline``): mbarrier phases and arrival counts, TMA
  transaction bytes, the two named barriers of the ping-pong, wgmma commit groups and waits,
  run under random interleavings; it reports deadlocks and any read of a smem stage that does
  not hold the tile the reader expects.

What it cannot show: that the hardware does the same (descriptors, swizzles, fragment
layouts, asynchronous-proxy ordering). Those need the GPU tests in test_mla_prefill_sm90.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

BLOCK_M = 128  # query rows per work tile (two consumer warpgroups x 64)
BLOCK_N = 128  # keys per stage
HEAD_DIM_V = 128
MAX_SECTION_HEADS = 16
RESCALE_THRESHOLD = 8.0
LOG2E = 1.4426950408889634
STAGES = 2


# ----------------------------------------------------------------------------- schedule
def m_blocks(lq: int) -> int:
    return (lq + BLOCK_M - 1) // BLOCK_M if lq > 0 else 0


def section_heads(lk: int, heads: int, kv_group: int, head_dim_qk: int, l2_budget: int) -> int:
    per_kv_head = max(lk, 1) * (head_dim_qk + HEAD_DIM_V) * 2
    fit = l2_budget // per_kv_head * kv_group
    s = 1
    while s * 2 <= MAX_SECTION_HEADS and s * 2 <= fit:
        s *= 2
    return min(s, heads)


def kv_end_of(lq: int, lk: int, m0: int, causal: bool) -> int:
    return min(lk, lk - lq + m0 + BLOCK_M) if causal else lk


def kv_tiles_of(kv_end: int) -> int:
    return (kv_end + BLOCK_N - 1) // BLOCK_N if kv_end > 0 else 0


def kv_unmasked_tiles(lq: int, lk: int, row0: int, causal: bool) -> int:
    e = min(lk, lk - lq + row0 + 1) if causal else lk
    return e // BLOCK_N if e > 0 else 0


@dataclass(frozen=True)
class Work:
    b: int
    h: int
    m_block: int
    q_start: int
    lq: int
    k_start: int
    lk: int


def schedule(cu_q: list[int], cu_k: list[int], heads: int, kv_group: int, head_dim_qk: int, l2_budget: int,
             cta: int, grid: int) -> Iterator[Work]:  # fmt: skip
    """The tiles CTA ``cta`` of ``grid`` processes, in order (mirrors ``Schedule::next``)."""
    t, b, base, count = cta, -1, 0, 0
    batch = len(cu_q) - 1
    q_start = k_start = lq = lk = mb = 0
    sw = 1
    while True:
        while t >= base + count:
            base += count
            b += 1
            if b >= batch:
                return
            q_start, k_start = cu_q[b], cu_k[b]
            lq, lk = max(cu_q[b + 1] - cu_q[b], 0), max(cu_k[b + 1] - cu_k[b], 0)
            mb = m_blocks(lq)
            sw = section_heads(lk, heads, kv_group, head_dim_qk, l2_budget)
            count = mb * heads
        local = t - base
        sec_tiles = sw * mb
        s = local // sec_tiles
        rem = local - s * sec_tiles
        width = min(sw, heads - s * sw)
        r = rem // width
        yield Work(b, s * sw + rem - r * width, mb - 1 - r, q_start, lq, k_start, lk)
        t += grid


# ----------------------------------------------------------------------------- numerics
@dataclass
class ModelStats:
    key_tiles: int = 0  # key tiles loaded (summed over work tiles)
    masked_tiles: int = 0  # (warpgroup, key tile) pairs that ran the masked softmax
    rescales: int = 0  # rows whose exponent base moved after their first key tile
    work_tiles: list[tuple[int, Work]] = field(default_factory=list)  # (cta, work) in schedule order


def _rows(t: torch.Tensor, start: int, count: int, head: int) -> torch.Tensor:
    """Rows start .. start + count of t[:, head] as TMA delivers them: past the tensor's end -> 0."""
    out = torch.zeros(count, t.shape[2], dtype=torch.float32)
    lo, hi = max(start, 0), min(start + count, t.shape[0])
    if hi > lo:
        out[lo - start : hi - start] = t[lo:hi, head].float()
    return out


def _warpgroup(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, work: Work, w: int, tiles: int, scale_log2: float,
               causal: bool, kv_group: int, stats: ModelStats) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One consumer warpgroup over its 64 rows of a work tile: (out fp32 [64, 128], lse [64])."""
    m0 = work.m_block * BLOCK_M
    i = m0 + 64 * w + torch.arange(64)  # query positions in the sequence
    lim = torch.minimum(torch.full_like(i, work.lk), work.lk - work.lq + i + 1) if causal else torch.full_like(i, work.lk)
    unmasked = kv_unmasked_tiles(work.lq, work.lk, m0 + 64 * w, causal)
    kvh = work.h // kv_group
    qw = _rows(q, work.q_start + m0 + 64 * w, 64, work.h)
    ninf = torch.tensor(float("-inf"))
    m = torch.full((64,), float("-inf"))
    l_sum = torch.zeros(64)
    o = torch.zeros(64, HEAD_DIM_V)
    for n in range(tiles - 1, -1, -1):  # last key tile first
        kt = _rows(k, work.k_start + n * BLOCK_N, BLOCK_N, kvh)
        vt = _rows(v, work.k_start + n * BLOCK_N, BLOCK_N, kvh)
        valid = work.lk - n * BLOCK_N
        if valid < BLOCK_N:
            vt[valid:] = 0  # zero_v_tail: rows past the sequence may be NaN
        s = qw @ kt.T
        if n >= unmasked:
            stats.masked_tiles += 1
            col = torch.arange(BLOCK_N)
            s = torch.where(col[None, :] < (lim - n * BLOCK_N)[:, None], s, ninf)  # a select, never arithmetic
        mx = s.max(dim=1).values * scale_log2
        up = mx > m + RESCALE_THRESHOLD
        stats.rescales += int((up & torch.isfinite(m)).sum())
        alpha = torch.where(up, torch.exp2(m - mx), torch.ones(64))
        m = torch.where(up, mx, m)
        base = torch.where(torch.isinf(m), torch.zeros(64), m)
        p = torch.exp2(s * scale_log2 - base[:, None])
        l_sum = l_sum * alpha + p.sum(dim=1)
        o = o * alpha[:, None] + p.to(torch.bfloat16).float() @ vt
    inv = torch.where(l_sum > 0, 1.0 / l_sum, torch.zeros(64))
    lse = torch.where(l_sum > 0, (m + torch.log2(l_sum)) / LOG2E, ninf)
    return o * inv[:, None], lse


def model_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  scale: float, causal: bool, grid: int = 132, l2_budget: int = 31 << 20,
                  ) -> tuple[torch.Tensor, torch.Tensor, ModelStats]:  # fmt: skip
    """The kernel's result computed the kernel's way (fp32, P in bf16). Rows outside every
    sequence are left NaN (the kernel does not write them)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    kv_group = heads // kv_heads
    cq, ck = [int(x) for x in cu_q], [int(x) for x in cu_k]
    out = torch.full((q.shape[0], heads, HEAD_DIM_V), float("nan"))
    lse = torch.full((q.shape[0], heads), float("nan"))
    stats = ModelStats()
    scale_log2 = scale * LOG2E
    for cta in range(grid):
        for work in schedule(cq, ck, heads, kv_group, q.shape[2], l2_budget, cta, grid):
            stats.work_tiles.append((cta, work))
            m0 = work.m_block * BLOCK_M
            tiles = kv_tiles_of(kv_end_of(work.lq, work.lk, m0, causal))
            stats.key_tiles += tiles
            for w in range(2):
                if tiles == 0:
                    o_w, lse_w = torch.zeros(64, HEAD_DIM_V), torch.full((64,), float("-inf"))
                else:
                    o_w, lse_w = _warpgroup(q, k, v, work, w, tiles, scale_log2, causal, kv_group, stats)
                for r in range(64):
                    i = m0 + 64 * w + r
                    tok = work.q_start + i
                    if i < work.lq and 0 <= tok < q.shape[0]:
                        out[tok, work.h] = o_w[r]
                        lse[tok, work.h] = lse_w[r]
    return out.to(q.dtype), lse, stats


# ----------------------------------------------------------------------------- protocol
class Deadlock(AssertionError):
    pass


class _Barrier:
    """mbarrier: arrival count, transaction bytes, completed-phase counter."""

    def __init__(self, count: int) -> None:
        self.count, self.pending, self.tx, self.completed = count, count, 0, 0

    def _check(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.completed += 1
            self.pending = self.count

    def arrive(self, expect_tx: int = 0) -> None:
        self.tx += expect_tx
        self.pending -= 1
        assert self.pending >= 0, "more arrivals than the barrier's count in one phase"
        self._check()

    def complete_tx(self, nbytes: int) -> None:
        self.tx -= nbytes
        self._check()

    def done(self, parity: int) -> bool:  # mbarrier.try_wait.parity
        return (self.completed & 1) != parity


class _Named:
    """bar.sync / bar.arrive with a thread count (a warpgroup = 128 threads)."""

    def __init__(self) -> None:
        self.arrived, self.generation = 0, 0

    def add(self, threads: int, expected: int) -> int:
        self.arrived += threads
        gen = self.generation
        if self.arrived == expected:
            self.arrived, self.generation = 0, self.generation + 1
        assert self.arrived < expected, "named barrier over-subscribed"
        return gen


FAULTS = ("no_first_turn", "release_v_before_wait", "release_q_after_first_qk", "k_wait_wrong_parity", "one_arrival_per_wg")


def simulate_pipeline(work_tiles: list[tuple[int, int]], seed: int, fault: str | None = None,
                      max_steps: int = 2_000_000) -> dict[str, int]:  # fmt: skip
    """Run the producer and both consumer warpgroups of one CTA over ``work_tiles`` = [(key tiles,
    partial last tile 0/1)] under a random interleaving (asynchronous TMA and wgmma completions
    included). Raises Deadlock or AssertionError; returns counters. ``fault`` (one of FAULTS)
    plants a protocol mistake, to show that the simulation catches it."""
    rng = random.Random(seed)
    q_bytes, k_bytes, v_bytes = 3 * 16384, 3 * 16384, 2 * 16384  # head_dim_qk 192: 3 panels; V: 2 panels
    flip = 1 if fault == "k_wait_wrong_parity" else 0
    bars = {"q_full": _Barrier(1), "q_empty": _Barrier(8)}
    for s in range(STAGES):
        bars[f"k_full{s}"], bars[f"k_empty{s}"] = _Barrier(1), _Barrier(8)
        bars[f"v_full{s}"], bars[f"v_empty{s}"] = _Barrier(1), _Barrier(8)
    named = {1: _Named(), 2: _Named(), 3: _Named(), 4: _Named()}
    smem: dict[str, Any] = {"q": None, **{f"k{s}": None for s in range(STAGES)}, **{f"v{s}": None for s in range(STAGES)}}
    inflight: list[dict[str, Any]] = []  # async ops: TMA loads and wgmma groups
    groups: dict[int, list[dict[str, Any]]] = {0: [], 1: []}  # per warpgroup, in commit order
    counters = {"tma": 0, "wgmma_groups": 0, "zeroed": 0}

    def tma(buf: str, tag: tuple, bar: str, nbytes: int) -> None:
        for g in groups[0] + groups[1]:
            assert buf not in g["reads"], f"TMA into {buf} while a wgmma group still reads it ({g['reads'][buf]})"
        inflight.append({"kind": "tma", "buf": buf, "tag": tag, "bar": bar, "bytes": nbytes})
        counters["tma"] += 1

    def wgmma(w: int, reads: dict[str, tuple]) -> None:
        for buf, tag in reads.items():
            assert smem[buf] == tag, f"warpgroup {w} issues a wgmma on {buf} = {smem[buf]}, expected {tag}"
        g = {"kind": "wgmma", "w": w, "reads": reads, "done": False}
        groups[w].append(g)
        inflight.append(g)
        counters["wgmma_groups"] += 1

    def wait_groups(w: int, pending: int) -> Callable[[], bool]:
        return lambda: sum(not g["done"] for g in groups[w]) <= pending

    def producer() -> Generator[Callable[[], bool], None, None]:
        q_iter = kv_iter = 0
        for work, (tiles, _partial) in enumerate(work_tiles):
            if tiles == 0:
                continue
            yield lambda qi=q_iter: bars["q_empty"].done((qi & 1) ^ 1)
            bars["q_full"].arrive(q_bytes)
            tma("q", ("Q", work), "q_full", q_bytes)
            q_iter += 1

            def load(kind: str, it: int, n: int, work: int = work) -> Generator[Callable[[], bool], None, None]:
                s = it % STAGES
                yield lambda: bars[f"{kind}_empty{s}"].done(((it // STAGES) & 1) ^ 1)
                nbytes = k_bytes if kind == "k" else v_bytes
                bars[f"{kind}_full{s}"].arrive(nbytes)
                tma(f"{kind}{s}", (kind.upper(), work, n), f"{kind}_full{s}", nbytes)

            yield from load("k", kv_iter, tiles - 1)
            for n in range(tiles - 2, -1, -1):
                yield from load("k", kv_iter + 1, n)
                yield from load("v", kv_iter, n + 1)
                kv_iter += 1
            yield from load("v", kv_iter, 0)
            kv_iter += 1

    def consumer(w: int) -> Generator[Callable[[], bool], None, None]:
        if w == 0 and fault != "no_first_turn":
            named[1].add(128, 256)  # warpgroup 0 takes the first turn
        warps = 1 if fault == "one_arrival_per_wg" else 4  # lane 0 of each warp arrives
        q_iter = kv_iter = 0

        def sync(bid: int, threads: int) -> Generator[Callable[[], bool], None, None]:
            gen = named[bid].add(128, threads)
            yield lambda: named[bid].generation > gen

        def zero_v(s: int, work: int, n: int) -> Generator[Callable[[], bool], None, None]:
            assert smem[f"v{s}"] == ("V", work, n), "zeroing V rows of a stage that holds another tile"
            counters["zeroed"] += 1
            yield from sync(3 + w, 128)

        for work, (tiles, partial) in enumerate(work_tiles):
            if tiles == 0:
                continue
            yield lambda qi=q_iter: bars["q_full"].done(qi & 1)
            n = tiles - 1
            s = kv_iter % STAGES
            yield lambda s=s, it=kv_iter: bars[f"k_full{s}"].done(((it // STAGES) & 1) ^ flip)
            wgmma(w, {"q": ("Q", work), f"k{s}": ("K", work, n)})
            yield wait_groups(w, 0)
            for _ in range(warps):
                bars[f"k_empty{s}"].arrive()
                if n == 0 or fault == "release_q_after_first_qk":
                    bars["q_empty"].arrive()
            for n in range(tiles - 2, -1, -1):
                sk, sv = (kv_iter + 1) % STAGES, kv_iter % STAGES
                yield lambda sk=sk, it=kv_iter + 1: bars[f"k_full{sk}"].done((it // STAGES) & 1)
                yield lambda sv=sv, it=kv_iter: bars[f"v_full{sv}"].done((it // STAGES) & 1)
                if partial and n + 1 == tiles - 1:
                    yield from zero_v(sv, work, n + 1)
                yield from sync(1 + w, 256)
                wgmma(w, {"q": ("Q", work), f"k{sk}": ("K", work, n)})
                wgmma(w, {f"v{sv}": ("V", work, n + 1)})
                named[2 - w].add(128, 256)  # bar.arrive on the other warpgroup's barrier
                yield wait_groups(w, 1)
                for _ in range(warps):
                    bars[f"k_empty{sk}"].arrive()
                    if n == 0 and fault != "release_q_after_first_qk":
                        bars["q_empty"].arrive()
                if fault == "release_v_before_wait":
                    for _ in range(warps):
                        bars[f"v_empty{sv}"].arrive()
                yield wait_groups(w, 0)
                if fault != "release_v_before_wait":
                    for _ in range(warps):
                        bars[f"v_empty{sv}"].arrive()
                kv_iter += 1
            sv = kv_iter % STAGES
            yield lambda sv=sv, it=kv_iter: bars[f"v_full{sv}"].done((it // STAGES) & 1)
            if partial and tiles == 1:
                yield from zero_v(sv, work, 0)
            wgmma(w, {f"v{sv}": ("V", work, 0)})
            yield wait_groups(w, 0)
            for _ in range(warps):
                bars[f"v_empty{sv}"].arrive()
            kv_iter += 1
            q_iter += 1

    agents = {"producer": producer(), "wg0": consumer(0), "wg1": consumer(1)}
    blocked: dict[str, Callable[[], bool] | None] = dict.fromkeys(agents)
    for _ in range(max_steps):
        ready = [a for a in agents if blocked[a] is None or blocked[a]()]
        # Asynchronous completions: TMA lands whole; wgmma groups retire in order per warpgroup.
        ops = [op for op in inflight if op["kind"] == "tma" or next(g for g in groups[op["w"]] if not g["done"]) is op]
        choices = [("agent", a) for a in ready] + [("op", op) for op in ops]
        if not choices:
            if not agents:
                return counters
            state = {n: (b.completed, b.pending, b.tx) for n, b in bars.items()}
            raise Deadlock(f"deadlock: agents {sorted(agents)} blocked; barriers (phase, pending, tx) {state}")
        kind, what = rng.choice(choices)
        if kind == "op":
            inflight.remove(what)
            if what["kind"] == "tma":
                for g in groups[0] + groups[1]:
                    assert what["buf"] not in g["reads"], f"TMA landed in {what['buf']} under an in-flight wgmma"
                smem[what["buf"]] = what["tag"]
                bars[what["bar"]].complete_tx(what["bytes"])
            else:
                for buf, tag in what["reads"].items():
                    assert smem[buf] == tag, f"{buf} changed under an in-flight wgmma: {smem[buf]} != {tag}"
                what["done"] = True
                groups[what["w"]] = [g for g in groups[what["w"]] if not g["done"]]
            continue
        try:
            blocked[what] = next(agents[what])
        except StopIteration:
            del agents[what]
            del blocked[what]
    raise AssertionError(f"simulation did not finish in {max_steps} steps")
