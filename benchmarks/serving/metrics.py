"""Serving metrics from per-request timestamps: TPOT, TTFT, ITL, steady-state TPM, cache hits, the envelope.

Definitions (all times in seconds from the run's start):
* TPOT of a request: (last chunk - first chunk) / (completion tokens - 1); tokens/s per user is
  1000 / mean TPOT in ms over the steady requests (those decoding wholly inside the window).
* ITL: the gap between consecutive streamed chunks of a request (a chunk holding several
  tokens, e.g. under speculative decoding, is one gap).
* Steady window: from the moment every slot (a simulated user) has finished its first request
  (the cold start: every user prefilling at once) to the moment the first slot runs out of work
  (after which fewer users are active). TPM/GPU counts tokens that arrived inside it.
* Prefix cache hit %: sum of usage.prompt_tokens_details.cached_tokens over sum of prompt tokens;
  also split into cold requests (each conversation's first in the run) and warm ones, and by turn
  (warm requests only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestRecord:
    conversation: str
    turn: int
    slot: int
    start: float  # request sent
    cold: bool = False  # the first request of its conversation in this run (no cache of it can exist)
    first_token: float | None = None  # first content chunk
    end: float | None = None  # stream closed
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)  # tokens per chunk (1 when the server does not say)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # None: the server did not report it
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and bool(self.chunk_times)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def percentile(values: list[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    arr = np.asarray(values, dtype=float)
    return None if arr.size == 0 else float(np.percentile(arr, q))


def tpot(rec: RequestRecord) -> float | None:
    """Seconds per output token after the first, None with fewer than two tokens."""
    n = rec.completion_tokens
    if not rec.ok or n < 2:
        return None
    return (rec.chunk_times[-1] - rec.chunk_times[0]) / (n - 1)


def inter_chunk_gaps(rec: RequestRecord) -> list[float]:
    return [b - a for a, b in zip(rec.chunk_times[:-1], rec.chunk_times[1:], strict=True)] if rec.ok else []


def token_arrivals(rec: RequestRecord) -> tuple[np.ndarray, np.ndarray]:
    """(chunk times, tokens per chunk) scaled so the tokens sum to the reported completion tokens
    (a token that released no text, e.g. an incomplete UTF-8 sequence, still counts)."""
    times = np.asarray(rec.chunk_times, dtype=float)
    counts = np.asarray(rec.chunk_tokens, dtype=float)
    total = counts.sum()
    if total > 0 and rec.completion_tokens > 0 and rec.completion_tokens != total:
        counts = counts * (rec.completion_tokens / total)
    return times, counts


def steady_window(records: list[RequestRecord]) -> tuple[float, float, bool]:
    """(start, end, steady): see the module docstring. Falls back to the whole run (steady=False)
    when the window is empty, e.g. when every slot had a single request."""
    ok = [r for r in records if r.ok]
    if not ok:
        return 0.0, 0.0, False
    by_slot: dict[int, list[RequestRecord]] = {}
    for r in records:
        by_slot.setdefault(r.slot, []).append(r)
    firsts, lasts = [], []
    for recs in by_slot.values():
        ends = [r.end for r in recs if r.end is not None]
        if ends:
            firsts.append(min(ends))
            lasts.append(max(ends))
    start, end = max(firsts), min(lasts)
    if end > start:
        return start, end, True
    return min(r.chunk_times[0] for r in ok), max(r.chunk_times[-1] for r in ok), False


def tokens_in_window(records: list[RequestRecord], start: float, end: float) -> float:
    total = 0.0
    for r in records:
        if r.chunk_times:
            times, counts = token_arrivals(r)
            total += float(counts[(times >= start) & (times <= end)].sum())
    return total


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    ms = [v * 1e3 for v in values]
    return {"mean": float(np.mean(ms)) if ms else None, "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


def _hit_pct(records: list[RequestRecord]) -> float | None:
    rep = [r for r in records if r.cached_tokens is not None and r.prompt_tokens]
    if not rep:
        return None
    return 100.0 * sum(r.cached_tokens for r in rep) / sum(r.prompt_tokens for r in rep)


def summarize_run(records: list[RequestRecord], concurrency: int, num_gpus: int, duration: float) -> dict[str, Any]:
    """The per-run numbers of the results JSON (times in ms, rates per second or minute)."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    ok = [r for r in records if r.ok]
    start, end, steady = steady_window(records)
    inside = [r for r in ok if r.chunk_times[0] >= start and r.chunk_times[-1] <= end]
    tpot_pool = [t for t in (tpot(r) for r in inside) if t is not None]
    tpot_from = "steady requests"
    if not tpot_pool:
        tpot_pool, tpot_from = [t for t in (tpot(r) for r in ok) if t is not None], "all requests"
    mean_tpot = float(np.mean(tpot_pool)) if tpot_pool else None
    window = end - start
    in_window = tokens_in_window(records, start, end)
    tpm_gpu = in_window * 60.0 / window / num_gpus if window > 0 else None
    by_turn: dict[int, list[RequestRecord]] = {}
    for r in ok:
        if not r.cold:  # a cold request (a conversation's first, e.g. a staggered start) has nothing cached
            by_turn.setdefault(r.turn, []).append(r)
    out_tokens = sum(r.completion_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens]
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "errors": sum(1 for r in records if not r.ok),
        "error_examples": sorted({r.error for r in records if r.error})[:3],
        "duration_s": duration,
        "steady_state": steady,
        "steady_window_s": [start, end],
        "output_tokens": out_tokens,
        "output_tokens_in_window": in_window,
        "mean_tpot_ms": mean_tpot * 1e3 if mean_tpot else None,
        "tpot_from": tpot_from,
        "tokens_per_s_per_user": 1.0 / mean_tpot if mean_tpot else None,
        "tpm_per_gpu": tpm_gpu,
        "output_tokens_per_s_total": out_tokens / duration if duration > 0 else None,
        "ttft_ms": _stats_ms([r.first_token - r.start for r in ok]),
        "ttft_cold_ms": _stats_ms([r.first_token - r.start for r in ok if r.cold]),
        "ttft_warm_ms": _stats_ms([r.first_token - r.start for r in ok if not r.cold]),
        "itl_ms": _stats_ms([g for r in ok for g in inter_chunk_gaps(r)]),
        "prompt_tokens_mean": float(np.mean(prompts)) if prompts else None,
        "cache_reported": any(r.cached_tokens is not None for r in ok),
        "prefix_cache_hit_pct": _hit_pct(ok),
        "prefix_cache_hit_pct_cold": _hit_pct([r for r in ok if r.cold]),
        "prefix_cache_hit_pct_warm": _hit_pct([r for r in ok if not r.cold]),
        "prefix_cache_hit_pct_by_turn": {str(t): _hit_pct(rs) for t, rs in sorted(by_turn.items())},
    }


# ---- the Pareto envelope and the floors -----------------------------------------------------
def pareto_envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper envelope: points no other point beats on both axes, x ascending (y then descends)."""
    env: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted({(float(x), float(y)) for x, y in points}, key=lambda p: (-p[0], -p[1])):
        if y > best:
            env.append((x, y))
            best = y
    return env[::-1]


def value_at_floor(envelope: list[tuple[float, float]], floor: float) -> dict[str, Any]:
    """TPM/GPU on the envelope at per-user rate ``floor`` (linear between envelope points)."""
    res: dict[str, Any] = {"floor_tokens_per_s": floor, "tpm_per_gpu": None, "reached": False}
    if not envelope:
        res["note"] = "no measured points"
        return res
    xs = [p[0] for p in envelope]
    if floor > xs[-1]:
        res["note"] = f"the best per-user rate measured is {xs[-1]:.1f} tokens/s"
        return res
    res["reached"] = True
    if floor <= xs[0]:
        res["tpm_per_gpu"] = envelope[0][1]
        res["note"] = (
            f"every point is above the floor (slowest {xs[0]:.1f} tokens/s): the highest TPM/GPU measured; "
            "a higher concurrency may give more"
        )
        return res
    for (x0, y0), (x1, y1) in zip(envelope[:-1], envelope[1:], strict=True):
        if x0 <= floor <= x1:
            res["tpm_per_gpu"] = y0 + (floor - x0) * (y1 - y0) / (x1 - x0) if x1 > x0 else max(y0, y1)
            res["note"] = f"interpolated between {x0:.1f} and {x1:.1f} tokens/s per user"
            return res
    raise AssertionError("unreachable: floor inside the envelope's range")
