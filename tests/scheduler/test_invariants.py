"""Pool, prefix-cache and planner invariants on targeted scenarios (the random workloads
in test_oracle_equivalence.py check the same invariants after every call)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tokenspeed_engine.scheduler import Scheduler, SchedulerConfig

from .sched_sim import Driver


def cfg(**kw) -> SchedulerConfig:
    base = dict(num_pages=64, page_size=4, max_num_batched_tokens=64, max_running_requests=8, max_context_len=128)
    return SchedulerConfig(**{**base, **kw})


def run_to_end(s: Scheduler, rid: int, token: int = 9) -> None:
    while s.has_request(rid):
        plan = s.next_plan()
        s.advance([(int(r), [token]) for r, smp in zip(plan.request_ids, plan.sample, strict=True) if smp])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("cache", [True, False])
def test_every_page_back_after_all_requests_end(seed, cache):
    rng = random.Random(seed)
    c = cfg(num_pages=rng.randrange(12, 40), page_size=rng.choice([1, 2, 4]), enable_prefix_cache=cache,
            max_num_batched_tokens=rng.randrange(4, 32), max_running_requests=rng.randrange(2, 6),
            decode_width=rng.choice([1, 2]))  # fmt: skip
    d = Driver(c, seed=seed, oracle=False, eos_p=0.05)
    shared = [rng.randrange(3) for _ in range(30)]
    for rid in range(25):
        d.submit(rid, shared[: rng.randrange(0, 30)] + [rng.randrange(3) for _ in range(rng.randrange(1, 8))],
                 rng.randrange(1, 12))  # fmt: skip
    for _ in range(30):  # overlap for a while, then drain
        d.plan() if len(d.inflight) < 2 else d.advance()
    d.drain()
    d.assert_all_pages_back()


def test_stats_add_up_and_private_pages_have_one_owner():
    d = Driver(cfg(num_pages=20), oracle=False)
    for rid in range(6):
        d.submit(rid, [1, 2, 3, 4, 5, 6, 7, 8, rid], 6)
    for _ in range(6):
        d.plan()
        d.advance()
        held = [p for r in d.live for p in d.cpp.request_info(r)["pages"]]
        for p in set(held):
            if held.count(p) > 1:  # only pages shared through the cache have several owners
                assert d.cpp.cached_page_tokens(p) != []
        st = d.cpp.stats()
        assert st.pages_used + st.pages_free + st.pages_cached == st.pages_total == 19
        assert st.pages_used == len(set(held))
    d.drain()


def test_last_prompt_token_is_always_recomputed():
    s = Scheduler(cfg())
    prompt = list(range(100, 116))  # exactly 4 full pages
    s.submit(1, prompt, 3)
    run_to_end(s, 1)
    s.submit(2, prompt, 3)
    plan = s.next_plan()
    # 4 pages are cached but only 3 may be used: the last prompt token must be computed.
    assert plan.prefix_lens.tolist() == [12] and plan.extend_lens.tolist() == [4]
    assert plan.input_ids.tolist() == prompt[12:]
    assert s.stats().prefix_hit_tokens == 12


def test_generated_tokens_are_cached():
    s = Scheduler(cfg(page_size=2))
    s.submit(1, [1, 2, 3], 6)
    run_to_end(s, 1, token=7)  # tokens 1 2 3 7 7 7 7 7 7; KV for the first 8
    s.submit(2, [1, 2, 3, 7, 7, 7, 7, 7, 7, 5], 2)
    plan = s.next_plan()
    assert plan.prefix_lens.tolist() == [8]


def test_same_page_tokens_under_another_parent_do_not_hit():
    s = Scheduler(cfg(page_size=2))
    s.submit(1, [1, 1, 5, 5, 9], 1)
    run_to_end(s, 1)
    s.submit(2, [2, 2, 5, 5, 9], 1)  # page [5, 5] is cached, but under parent [1, 1]
    plan = s.next_plan()
    assert plan.prefix_lens.tolist() == [0]
    s.advance([(2, [3])])
    s.submit(3, [1, 1, 5, 5, 8], 1)
    plan = s.next_plan()
    assert plan.prefix_lens.tolist() == [4]


def test_lru_evicts_least_recently_released_leaf_first():
    s = Scheduler(cfg(num_pages=7, page_size=2, max_context_len=12))  # 6 usable pages
    s.submit(1, [1, 1, 2, 2, 3], 1)
    run_to_end(s, 1)  # caches [1,1] <- [2,2]
    s.submit(2, [4, 4, 5, 5, 6], 1)
    run_to_end(s, 2)  # caches [4,4] <- [5,5], released later
    assert s.stats().pages_cached == 4
    s.submit(3, [8] * 9, 1)  # needs 5 pages: 2 free + 3 evicted (oldest leaves first)
    s.next_plan()
    s.check_invariants()
    assert s.stats().pages_cached == 1
    s.advance([(3, [0])])
    s.submit(4, [4, 4, 9], 1)  # [4,4] was released last: it survives
    assert s.next_plan().prefix_lens.tolist() == [2]


def test_overlap_marks_unknown_inputs_and_is_one_step_deep():
    s = Scheduler(cfg())
    s.submit(1, [1, 2, 3, 4, 5], 5)
    p1 = s.next_plan()
    assert p1.input_ids.tolist() == [1, 2, 3, 4, 5] and p1.sample.tolist() == [1]
    p2 = s.next_plan()  # planned before step 1's token is known
    assert p2.input_ids.tolist() == [-1] and p2.positions.tolist() == [5] and p2.prefix_lens.tolist() == [5]
    with pytest.raises(RuntimeError, match="in flight"):
        s.next_plan()
    s.advance([(1, [42])])
    p3 = s.next_plan()
    assert p3.input_ids.tolist() == [-1] and p3.positions.tolist() == [6]
    s.advance([(1, [43])])
    p4 = s.next_plan()
    assert p4.input_ids.tolist() == [-1] and p4.positions.tolist() == [7]
    s.advance([(1, [44])])
    assert s.request_info(1)["tokens"] == [1, 2, 3, 4, 5, 42, 43, 44]
    s.check_invariants()


def test_speculative_reservation_and_acceptance():
    s = Scheduler(cfg(decode_width=4, page_size=4))
    s.submit(1, [1, 2, 3], 20)
    s.next_plan()
    s.advance([(1, [10])])
    plan = s.next_plan()
    assert plan.extend_lens.tolist() == [4]
    assert plan.input_ids.tolist() == [10, -1, -1, -1]
    assert plan.positions.tolist() == [3, 4, 5, 6]
    assert len(s.request_info(1)["pages"]) == 2  # positions up to 6 reserved
    assert s.next_plan().num_requests == 0  # overlap: acceptance length unknown, so it waits
    s.advance([(1, [11, 12])])  # one draft accepted + bonus token
    s.advance()
    plan = s.next_plan()
    assert plan.prefix_lens.tolist() == [5] and plan.input_ids.tolist() == [12, -1, -1, -1]
    with pytest.raises(ValueError, match=r"request 1 \(state Decoding\) reported 5 tokens"):
        s.advance([(1, [1, 2, 3, 4, 5])])
    s.advance([(1, [13, 14, 15, 16])])
    assert s.request_info(1)["tokens"][-4:] == [13, 14, 15, 16]


def test_max_new_tokens_caps_speculative_tokens():
    s = Scheduler(cfg(decode_width=3))
    s.submit(1, [1, 2, 3], 2)
    s.next_plan()
    s.advance([(1, [10])])
    s.next_plan()
    assert s.advance([(1, [11, 12, 13])]) == [(1, "length")]
    assert s.stats().pages_used == 0


def test_block_table_is_a_read_only_zero_copy_view():
    s = Scheduler(cfg(max_running_requests=3, max_context_len=32, page_size=4))
    bt = s.block_table
    assert bt.shape == (3, 8) and bt.dtype == np.int32
    s.submit(1, list(range(9)), 2)
    plan = s.next_plan()
    assert np.shares_memory(bt, plan.block_table)
    assert bt[plan.slots[0], :3].tolist() == s.request_info(1)["pages"] and 0 not in bt[0, :3]
    with pytest.raises(ValueError):
        bt[0, 0] = 5


def test_bad_reports_change_nothing():
    s = Scheduler(cfg())
    s.submit(1, [1, 2, 3], 4)
    s.submit(2, [4, 5, 6], 4)
    s.next_plan()
    before = (s.stats().as_dict(), s.request_info(1), s.request_info(2))
    for events, pattern in [
        ([(1, [7])], r"request 2 \(state Decoding\) reported no tokens in step 1"),
        ([(1, [7]), (2, [8]), (3, [9])], r"request 3 \(not live\) has no token-producing entry in step 1"),
        ([(1, [7]), (2, [8, 9])], r"request 2 \(state Decoding\) reported 2 tokens in step 1, expected 1"),
        ([(1, [7]), (1, [7]), (2, [8])], "reported twice"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            s.advance(events)
        assert (s.stats().as_dict(), s.request_info(1), s.request_info(2)) == before
    with pytest.raises(ValueError, match="outside"):
        s.advance([(1, [-3]), (2, [8])])
    assert s.advance({1: [7], 2: [8]}) == []


def test_submit_errors():
    s = Scheduler(cfg(max_context_len=16))
    s.submit(1, [1], 1)
    with pytest.raises(ValueError, match=r"request 1 already exists \(state Waiting\)"):
        s.submit(1, [2], 1)
    with pytest.raises(ValueError, match="no prompt tokens"):
        s.submit(2, [], 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.submit(3, [1], 0)
    with pytest.raises(ValueError, match="max_context_len"):
        s.submit(4, list(range(10)), 10)
    with pytest.raises(RuntimeError, match="no plan in flight"):
        s.advance()
