"""Scheduler overhead per decode step: next_plan() + advance() at 64, 256 and 1024 running
requests, every request a 50K-token context sharing one prefix (an agent fleet on one
repository), C++ scheduler vs the pure-Python oracle of the same policy.

Set-up per size N: one request primes the prefix cache with the shared 50K-token prefix;
N requests (prefix + 64 own tokens) are admitted, hit the cache for the prefix and
prefill their own tokens; then every step is a batch of N decodes. Timed: the wall time
of next_plan() + advance_arrays() (C++) / next_plan() + advance() (oracle) per step, with
the executor's outputs prepared outside the timed region. The oracle is timed on fewer
steps. Budget: a 10 ms decode step, of which the scheduler may take 2% (200 us).

    python benchmarks/bench_scheduler.py [--steps 200] [--oracle-steps 10] [--sizes 64,256,1024]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from tokenspeed_engine.scheduler import Scheduler, SchedulerConfig
from tokenspeed_engine.scheduler.oracle import OracleScheduler

PREFIX = 50_000
OWN = 64
PAGE = 64
STEP_BUDGET_US = 10_000.0


def make_config(n: int, steps: int) -> SchedulerConfig:
    per_request = -(-(OWN + steps + 64) // PAGE) + 1
    return SchedulerConfig(
        num_pages=PREFIX // PAGE + n * per_request + 256,
        page_size=PAGE,
        max_num_batched_tokens=16_384,
        max_running_requests=n,
        decode_width=1,
        enable_prefix_cache=True,
        max_context_len=PREFIX + OWN + steps + 128,
    )


def report(sched, plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.asarray(plan.request_ids)[np.asarray(plan.sample) == 1]
    return ids, np.ones(len(ids), np.int32), (ids % 1000).astype(np.int32)


def set_up(sched, n: int, rng: np.random.Generator, max_new: int) -> None:
    """Prime the cache with the shared prefix, admit n requests, run until all decode."""
    prefix = rng.integers(0, 32_000, PREFIX).tolist()
    sched.submit(-1, prefix, 1)
    while sched.has_request(-1):
        sched.advance_arrays(*report(sched, sched.next_plan()))
    for rid in range(n):
        sched.submit(rid, prefix + rng.integers(0, 32_000, OWN).tolist(), max_new)
    while True:
        plan = sched.next_plan()
        sched.advance_arrays(*report(sched, plan))
        if len(plan) == n and int(np.asarray(plan.extend_lens).sum()) == n:
            break
    hit = sched.stats().prefix_hit_tokens
    assert hit >= n * (PREFIX // PAGE) * PAGE, f"prefix cache missed: {hit} hit tokens for {n} requests"


def time_steps(sched, n: int, steps: int, arrays: bool) -> list[float]:
    ones, toks = np.ones(n, np.int32), np.arange(n, dtype=np.int32) % 1000
    events = [(rid, [7]) for rid in range(n)]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        plan = sched.next_plan()
        if arrays:
            sched.advance_arrays(plan.request_ids, ones, toks)
        else:
            sched.advance(events)
        out.append((time.perf_counter_ns() - t0) / 1e3)
        assert len(plan) == n
    return out


def bench(n: int, steps: int, oracle_steps: int) -> dict:
    rng = np.random.default_rng(n)
    total = 5 + steps + steps // 4 + oracle_steps + 16  # decode steps a request may take, warm-up included
    cfg = make_config(n, total)
    cpp = Scheduler(cfg)
    t0 = time.perf_counter()
    set_up(cpp, n, rng, total)
    setup_cpp = time.perf_counter() - t0
    time_steps(cpp, n, 5, arrays=True)  # warm caches
    cpp_us = time_steps(cpp, n, steps, arrays=True)
    cpp_list_us = time_steps(cpp, n, max(steps // 4, 1), arrays=False)  # advance([(id, [tok]), ...])
    st = cpp.stats()
    assert st.pages_used + st.pages_free + st.pages_cached == st.pages_total

    ref = OracleScheduler(cfg)
    rng = np.random.default_rng(n)
    t0 = time.perf_counter()
    set_up(ref, n, rng, total)
    setup_ref = time.perf_counter() - t0
    ref_us = time_steps(ref, n, oracle_steps, arrays=False)
    return dict(
        n=n,
        cpp_mean=statistics.fmean(cpp_us),
        cpp_p50=statistics.median(cpp_us),
        cpp_p99=sorted(cpp_us)[int(0.99 * (len(cpp_us) - 1))],
        cpp_list=statistics.fmean(cpp_list_us),
        ref_mean=statistics.fmean(ref_us),
        setup_cpp=setup_cpp,
        setup_ref=setup_ref,
        steps=steps,
        oracle_steps=oracle_steps,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed C++ steps per size")
    ap.add_argument("--oracle-steps", type=int, default=10, help="timed oracle steps per size")
    ap.add_argument("--sizes", default="64,256,1024")
    args = ap.parse_args()
    rows = [bench(int(n), args.steps, args.oracle_steps) for n in args.sizes.split(",")]
    print(f"# scheduler plan+advance per decode step; {PREFIX}-token shared prefix + {OWN} own tokens, "
          f"page {PAGE}; {platform.processor() or platform.machine()}, python {platform.python_version()}")  # fmt: skip
    print(f"# C++ timed over {args.steps} steps (mean/p50/p99), oracle over {args.oracle_steps} steps (mean); "
          "'w/ list events': C++ with advance([(id, [token]), ...]) instead of advance_arrays")  # fmt: skip
    header = (
        "running | C++ us/step (mean / p50 / p99) | % of 10 ms step | oracle us/step | C++ speed-up "
        "| C++ w/ list events | set-up s (C++ / oracle)"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for r in rows:
        speedup = r["ref_mean"] / r["cpp_mean"]
        pct = 100.0 * r["cpp_mean"] / STEP_BUDGET_US
        print(
            f"{r['n']:7d} | {r['cpp_mean']:9.1f} / {r['cpp_p50']:7.1f} / {r['cpp_p99']:7.1f}   | "
            f"{pct:14.2f}% | {r['ref_mean']:14.1f} | {speedup:11.1f}x  | {r['cpp_list']:18.1f} "
            f"| {r['setup_cpp']:6.2f} / {r['setup_ref']:.2f}"
        )
        ok &= speedup >= 20 and (r["n"] != 256 or r["cpp_mean"] < 200)
    print(f"# targets (>= 20x faster than the oracle; < 200 us at 256 running): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
