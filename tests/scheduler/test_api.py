"""The Python surface: config conversion, plan arrays, both advance forms, stats."""

from __future__ import annotations

import numpy as np
import pytest

from tokenspeed_engine import _scheduler
from tokenspeed_engine.scheduler import NULL_PAGE, Scheduler, SchedulerConfig
from tokenspeed_engine.scheduler.oracle import OracleScheduler


def test_config_round_trip_and_validation():
    c = SchedulerConfig(num_pages=10, page_size=8, max_context_len=100)
    native = c.to_native()
    assert (native.num_pages, native.page_size, native.max_pages_per_req) == (10, 8, 13) == (10, 8, c.max_pages_per_req)
    assert Scheduler(c).config == c
    assert Scheduler(c, decode_width=2).config.decode_width == 2
    with pytest.raises(ValueError, match="null page"):
        _scheduler.SchedulerConfig(num_pages=1)
    with pytest.raises(ValueError, match="decode_width"):
        SchedulerConfig(decode_width=0).to_native()


def test_plan_arrays_have_the_documented_types():
    s = Scheduler(SchedulerConfig(num_pages=32, page_size=4, max_context_len=64))
    s.submit(5, np.arange(6, dtype=np.int64), 3)
    s.submit(6, [9, 9], 3)
    plan = s.next_plan()
    assert plan.step == 1 and len(plan) == plan.num_requests == 2 and plan.num_tokens == 8
    assert plan.request_ids.dtype == np.int64 and plan.sample.dtype == np.uint8
    for name in ("slots", "prefix_lens", "extend_lens", "input_ids", "positions", "block_table"):
        assert getattr(plan, name).dtype == np.int32, name
    assert plan.request_ids.tolist() == [5, 6] and plan.slots.tolist() == [0, 1]
    assert plan.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert NULL_PAGE == 0 and 0 not in plan.block_table[0, :2] and plan.block_table[0, 2] == NULL_PAGE


def test_advance_arrays_matches_advance_and_the_oracle():
    c = SchedulerConfig(num_pages=64, page_size=2, max_context_len=64)
    a, b, o = Scheduler(c), Scheduler(c), OracleScheduler(c)
    for s in (a, b, o):
        for rid in range(4):
            s.submit(rid, [rid, 1, 2], 4)
    for step in range(5):
        pa, pb, po = a.next_plan(), b.next_plan(), o.next_plan()
        ids = pa.request_ids[pa.sample == 1]
        toks = (ids * 10 + step).astype(np.int32)
        da = a.advance_arrays(ids, np.ones(len(ids), np.int32), toks)
        db = b.advance([(int(r), [int(t)]) for r, t in zip(ids, toks, strict=True)])
        do = o.advance_arrays(ids, np.ones(len(ids), np.int32), toks)
        assert da == db == do
        assert pa.input_ids.tolist() == pb.input_ids.tolist() == po.input_ids.tolist()
    assert a.stats().as_dict() == b.stats().as_dict() == vars(o.stats())
    assert a.stats().num_finished == 4 and a.stats().pages_used == 0


def test_stats_and_finish_reasons():
    s = Scheduler(SchedulerConfig(num_pages=16, page_size=2, max_context_len=32))
    s.submit(1, [1, 2, 3], 5)
    s.submit(2, [1, 2, 4], 5)
    s.submit(3, [7], 5)
    s.next_plan()
    done = s.advance([(1, [5]), (2, [6]), (3, [7])], finished=[1], aborted=[2])
    assert done == [(1, "stop"), (2, "abort")]
    st = s.stats()
    assert (st.num_finished, st.num_running, st.num_steps, st.num_inflight_plans) == (2, 1, 1, 0)
    assert st.pages_cached == 1  # [1, 2] cached once (request 2 swapped its copy for it)
    assert "prefix_hit_tokens" in repr(st)
