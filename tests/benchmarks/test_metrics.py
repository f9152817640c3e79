"""Metric arithmetic on synthetic timestamps: TPOT, percentiles, the steady window, TPM, floors."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.serving.metrics import (
    RequestRecord,
    pareto_envelope,
    percentile,
    steady_window,
    summarize_run,
    tokens_in_window,
    tpot,
    value_at_floor,
)


def rec(
    slot: int,
    start: float,
    first: float,
    gap: float,
    n: int,
    turn: int = 1,
    prompt: int = 100,
    cached: int | None = 80,
    cold: bool = False,
) -> RequestRecord:
    times = [first + i * gap for i in range(n)]
    return RequestRecord(f"c{slot}", turn, slot, start, cold, first, times[-1] + 0.001, times, [1] * n, prompt, cached, n)


def test_tpot_and_percentiles() -> None:
    r = rec(0, 0.0, 0.5, 0.02, 11)
    assert tpot(r) == pytest.approx(0.02)
    assert tpot(rec(0, 0.0, 0.5, 0.02, 1)) is None
    r.error = "HTTP 500"
    assert tpot(r) is None
    vals = list(range(1, 101))
    assert percentile(vals, 50) == pytest.approx(50.5) and percentile(vals, 99) == pytest.approx(99.01)
    assert percentile([], 50) is None


def test_tokens_are_rescaled_to_the_reported_count() -> None:
    r = rec(0, 0.0, 1.0, 0.1, 4)
    r.completion_tokens = 8  # e.g. tokens that released no text: each chunk stands for two
    assert tokens_in_window([r], 1.0, 1.15) == pytest.approx(4.0)


def test_steady_window_two_slots() -> None:
    # slot 0: requests ending at ~1.2 and ~3.2; slot 1: ~2.2 and ~5.2 -> window [2.2, 3.2]
    recs = [rec(0, 0.0, 0.2, 0.1, 11), rec(0, 1.3, 2.2, 0.1, 11), rec(1, 0.0, 1.2, 0.1, 11), rec(1, 2.3, 4.2, 0.1, 11)]
    start, end, steady = steady_window(recs)
    assert steady and start == pytest.approx(2.201) and end == pytest.approx(3.201)
    # one request per slot: no steady window, the whole run instead
    start, end, steady = steady_window([rec(0, 0.0, 0.2, 0.1, 11), rec(1, 0.0, 0.3, 0.1, 11)])
    assert not steady and start == pytest.approx(0.2) and end == pytest.approx(1.3)


def test_summarize_run_by_hand() -> None:
    # two slots decoding back to back at 50 ms/token (20 tokens/s per user), 20 tokens per request
    recs = []
    for slot in range(2):
        t = 0.0
        for turn in range(4):
            first = t + 0.3 + 0.01 * slot
            r = rec(
                slot,
                t,
                first,
                0.05,
                20,
                turn=turn,
                prompt=1000 * (turn + 1),
                cached=0 if turn == 0 else 900 * turn,
                cold=turn == 0,
            )
            recs.append(r)
            t = r.end
    s = summarize_run(recs, concurrency=2, num_gpus=2, duration=max(r.end for r in recs))
    assert s["tokens_per_s_per_user"] == pytest.approx(20.0) and s["mean_tpot_ms"] == pytest.approx(50.0)
    start, end = s["steady_window_s"]
    inside = sum(1 for r in recs for t in r.chunk_times if start <= t <= end)
    assert s["tpm_per_gpu"] == pytest.approx(inside * 60 / (end - start) / 2)
    ttfts = [r.first_token - r.start for r in recs]
    assert s["ttft_ms"]["p50"] == pytest.approx(np.percentile(ttfts, 50) * 1e3)
    assert s["itl_ms"]["p99"] == pytest.approx(50.0)
    cached, prompt = 2 * (900 + 1800 + 2700), 2 * (1000 + 2000 + 3000 + 4000)
    assert s["prefix_cache_hit_pct"] == pytest.approx(100 * cached / prompt)
    assert "0" not in s["prefix_cache_hit_pct_by_turn"]  # turn 0 is cold: not in the warm split
    assert s["prefix_cache_hit_pct_cold"] == 0.0 and s["prefix_cache_hit_pct_by_turn"]["3"] == pytest.approx(100 * 2700 / 4000)
    assert s["errors"] == 0 and s["steady_state"] and s["cache_reported"]
    recs[-1].error = "boom"
    assert summarize_run(recs, 2, 1, 10.0)["errors"] == 1
    no_cache = [rec(0, 0.0, 0.1, 0.01, 5, cached=None)]
    assert summarize_run(no_cache, 1, 1, 1.0)["prefix_cache_hit_pct"] is None


def test_envelope_and_floors() -> None:
    pts = [(300.0, 10.0), (150.0, 40.0), (100.0, 35.0), (50.0, 90.0), (150.0, 20.0), (20.0, 80.0)]
    env = pareto_envelope(pts)
    assert env == [(50.0, 90.0), (150.0, 40.0), (300.0, 10.0)]
    v = value_at_floor(env, 70.0)
    assert v["reached"] and v["tpm_per_gpu"] == pytest.approx(90 + (70 - 50) * (40 - 90) / 100)
    assert value_at_floor(env, 200.0)["tpm_per_gpu"] == pytest.approx(40 + 50 * (10 - 40) / 150)
    miss = value_at_floor(env, 400.0)
    assert not miss["reached"] and miss["tpm_per_gpu"] is None and "best per-user rate measured is 300.0" in miss["note"]
    low = value_at_floor(env, 10.0)
    assert low["reached"] and low["tpm_per_gpu"] == 90.0 and "higher concurrency" in low["note"]
    assert value_at_floor([], 70.0)["reached"] is False
