"""The C++ planner equals the Python oracle on thousands of random workloads.

Each workload draws a configuration (tiny pools so that retraction and eviction happen
often, page sizes 1..8, speculative widths 1..3, cache on/off), requests that share
prefixes over a 4-token vocabulary (so equal pages under different parents are common),
follow-up turns built from finished requests' tokens, random overlap (plan N+1 before
advance N), EOS finishes, aborts in every state and speculative acceptance. After every
call: identical plans (incl. page ids and the whole block table), identical stats and
finish lists, both sides' invariants, and the fake executor's KV check.
Set TS_SCHED_EXAMPLES to change the number of examples (default 2500, plus a fifth as many large ones).
"""

from __future__ import annotations

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenspeed_engine.scheduler import SchedulerConfig

from .sched_sim import Driver

EXAMPLES = int(os.environ.get("TS_SCHED_EXAMPLES", "2500"))


@st.composite
def workloads(draw):
    cfg = SchedulerConfig(
        num_pages=draw(st.integers(4, 40)),
        page_size=draw(st.sampled_from([1, 2, 3, 4, 8])),
        max_num_batched_tokens=draw(st.integers(1, 40)),
        max_running_requests=draw(st.integers(1, 6)),
        decode_width=draw(st.sampled_from([1, 1, 2, 3])),
        enable_prefix_cache=draw(st.booleans()),
        max_context_len=draw(st.sampled_from([48, 128])),
    )
    bases = [draw(st.lists(st.integers(0, 3), max_size=32)) for _ in range(3)]
    requests = draw(
        st.lists(
            st.tuples(
                st.integers(0, 12),  # iteration at which it is submitted
                st.integers(0, 1),  # prefix family
                st.integers(0, 32),  # how much of the family prefix it shares
                st.lists(st.integers(0, 3), max_size=10),  # own suffix
                st.integers(1, 10),  # max_new_tokens
            ),
            min_size=1,
            max_size=10,
        )
    )
    knobs = dict(
        seed=draw(st.integers(0, 2**31)),
        overlap_p=draw(st.sampled_from([0.0, 0.5, 1.0])),
        eos_p=draw(st.sampled_from([0.0, 0.1])),
        abort_p=draw(st.sampled_from([0.0, 0.03])),
        followup_p=draw(st.sampled_from([0.0, 0.5])),
        accept_p=draw(st.sampled_from([0.0, 0.7, 1.0])),
    )
    return cfg, bases, sorted(requests, key=lambda r: r[0]), knobs


def run_workload(cfg, bases, requests, knobs, oracle=True) -> Driver:
    rng = random.Random(knobs["seed"])
    d = Driver(cfg, seed=knobs["seed"], oracle=oracle, accept_p=knobs["accept_p"], eos_p=knobs["eos_p"])
    queue = [(at, (bases[fam][:k] + suffix) or [0], max_new) for at, fam, k, suffix, max_new in requests]
    next_id, seen_final = 0, 0
    for it in range(3_000):
        while queue and queue[0][0] <= it:
            _, prompt, max_new = queue.pop(0)
            d.submit(next_id, prompt, max_new)
            next_id += 1
        # Follow-up turns: the whole previous conversation plus a new message.
        finals = list(d.final.values())
        for tokens, _ in finals[seen_final:]:
            if next_id < 40 and rng.random() < knobs["followup_p"]:
                d.submit(next_id, tokens + [rng.randrange(4) for _ in range(rng.randrange(1, 4))], rng.randrange(1, 6))
                next_id += 1
        seen_final = len(finals)
        aborts = []
        if d.live and rng.random() < knobs["abort_p"]:
            victim = rng.choice(sorted(d.live))
            if rng.random() < 0.5:
                d.abort(victim)
            else:
                aborts = [victim]
        if not d.inflight:
            d.plan()
        elif len(d.inflight) == 1 and d.live and rng.random() < knobs["overlap_p"]:
            d.plan()
        else:
            d.advance(aborts, drop_dead_events=rng.random() < 0.5)
        if not queue and not d.live and not d.inflight:
            d.assert_all_pages_back()
            return d
    raise AssertionError("workload did not finish (livelock?)")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(workloads())
def test_cpp_plans_equal_oracle(workload):
    run_workload(*workload)


@st.composite
def large_workloads(draw):
    """Fewer, bigger workloads: 10-30 requests with long shared prefixes, built from one
    drawn seed (hypothesis tends to draw small lists, so size is forced here)."""
    rng = random.Random(draw(st.integers(0, 2**31)))
    page_size = rng.choice([1, 2, 4, 8, 16])
    cfg = SchedulerConfig(
        num_pages=rng.randrange(8, 120),
        page_size=page_size,
        max_num_batched_tokens=rng.randrange(4, 96),
        max_running_requests=rng.randrange(2, 12),
        decode_width=rng.choice([1, 1, 2, 4]),
        enable_prefix_cache=rng.random() < 0.8,
        max_context_len=256,
    )
    bases = [[rng.randrange(4) for _ in range(rng.randrange(0, 120))] for _ in range(3)]
    requests = sorted(
        (
            rng.randrange(0, 60),
            rng.randrange(2) + (rng.random() < 0.3),
            rng.randrange(0, 120),
            [rng.randrange(4) for _ in range(rng.randrange(0, 20))],
            rng.randrange(1, 30),
        )
        for _ in range(rng.randrange(10, 30))
    )
    knobs = dict(
        seed=rng.randrange(2**31),
        overlap_p=rng.choice([0.0, 0.7, 1.0]),
        eos_p=rng.choice([0.0, 0.05]),
        abort_p=rng.choice([0.0, 0.02]),
        followup_p=rng.choice([0.0, 0.7]),
        accept_p=rng.choice([0.3, 0.8]),
    )
    return cfg, bases, requests, knobs


@settings(max_examples=max(EXAMPLES // 5, 20), deadline=None, suppress_health_check=list(HealthCheck))
@given(large_workloads())
def test_cpp_plans_equal_oracle_large(workload):
    run_workload(*workload)
