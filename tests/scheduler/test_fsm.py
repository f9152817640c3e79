"""Request FSM: the transition table, errors naming state and event, and the lifecycle
as seen through the scheduler."""

from __future__ import annotations

import itertools

import pytest

from tokenspeed_engine import _scheduler
from tokenspeed_engine.scheduler import IllegalTransitionError, Scheduler, SchedulerConfig
from tokenspeed_engine.scheduler.oracle import TRANSITIONS

STATES = ["Waiting", "Prefilling", "Decoding", "Retracted", "Finished"]
EVENTS = ["Admit", "PrefillDone", "Retract", "Finish"]
LEGAL = {
    ("Waiting", "Admit"): "Prefilling",
    ("Retracted", "Admit"): "Prefilling",
    ("Prefilling", "PrefillDone"): "Decoding",
    ("Prefilling", "Retract"): "Retracted",
    ("Decoding", "Retract"): "Retracted",
    ("Waiting", "Finish"): "Finished",
    ("Prefilling", "Finish"): "Finished",
    ("Decoding", "Finish"): "Finished",
    ("Retracted", "Finish"): "Finished",
}


@pytest.mark.parametrize("state,event", list(itertools.product(STATES, EVENTS)))
def test_transition_table(state, event):
    if (state, event) in LEGAL:
        assert _scheduler._fsm_probe(state, event) == LEGAL[(state, event)]
    else:
        with pytest.raises(IllegalTransitionError) as err:
            _scheduler._fsm_probe(state, event)
        msg = str(err.value)
        assert f"'{event}'" in msg and f"'{state}'" in msg, msg
        assert isinstance(err.value, RuntimeError)


def test_oracle_has_the_same_table():
    assert TRANSITIONS == LEGAL


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match="unknown state"):
        _scheduler._fsm_probe("Sleeping", "Admit")
    with pytest.raises(ValueError, match="unknown event"):
        _scheduler._fsm_probe("Waiting", "Wake")


def state(s: Scheduler, rid: int) -> str:
    return s.request_info(rid)["state"] if s.has_request(rid) else "Finished"


def test_lifecycle_through_the_scheduler():
    # 3 usable pages of 4 tokens; a 10-token prompt in chunks of 4.
    s = Scheduler(SchedulerConfig(num_pages=4, page_size=4, max_num_batched_tokens=4, max_running_requests=2,
                                  max_context_len=12))  # fmt: skip
    s.submit(1, list(range(10)), max_new_tokens=2)
    assert state(s, 1) == "Waiting"
    s.next_plan()
    assert state(s, 1) == "Prefilling"
    s.advance()
    s.next_plan()
    s.advance()
    plan = s.next_plan()  # last chunk (2 tokens) samples: the request is decoding now
    assert plan.extend_lens.tolist() == [2] and plan.sample.tolist() == [1]
    assert state(s, 1) == "Decoding"
    assert s.advance([(1, [7])]) == []
    plan = s.next_plan()
    assert plan.input_ids.tolist() == [7] and plan.positions.tolist() == [10]
    assert s.advance([(1, [8])]) == [(1, "length")]
    assert state(s, 1) == "Finished"
    assert s.stats().pages_used == 0


def test_retracted_state_and_readmission():
    # Two requests of 4 tokens each fill 2 pages of 4; the third page goes to the older
    # decode, then the older one needs a 4th page: the newer one is retracted.
    s = Scheduler(SchedulerConfig(num_pages=4, page_size=4, max_num_batched_tokens=16, max_running_requests=2,
                                  enable_prefix_cache=False, max_context_len=16))  # fmt: skip
    s.submit(1, [1, 2, 3, 4], max_new_tokens=9)
    s.submit(2, [5, 6, 7, 8], max_new_tokens=9)
    s.next_plan()
    s.advance([(1, [10]), (2, [20])])
    plan = s.next_plan()  # request 1 takes page 3 for position 4; request 2 needs one too: retracted
    assert plan.request_ids.tolist() == [1]
    assert state(s, 2) == "Retracted"
    assert s.request_info(2)["tokens"] == [5, 6, 7, 8, 20]  # tokens kept
    assert s.stats().num_retractions == 1
    s.abort(1)
    s.advance()  # request 1 finished meanwhile: its tokens are not needed
    plan = s.next_plan()  # request 2 re-enters and recomputes all 5 known tokens
    assert plan.request_ids.tolist() == [2]
    assert plan.prefix_lens.tolist() == [0] and plan.extend_lens.tolist() == [5]
    assert plan.input_ids.tolist() == [5, 6, 7, 8, 20]
    assert state(s, 2) == "Decoding"


def test_abort_in_every_state():
    s = Scheduler(SchedulerConfig(num_pages=64, page_size=2, max_num_batched_tokens=4, max_running_requests=1,
                                  max_context_len=64))  # fmt: skip
    s.submit(1, list(range(9)), 5)  # will be Prefilling after one step
    s.submit(2, [1, 2], 5)  # stays Waiting (one running slot)
    s.next_plan()
    assert state(s, 1) == "Prefilling" and state(s, 2) == "Waiting"
    assert s.abort(2) and s.abort(1)
    assert not s.abort(1)  # already gone: idempotent
    s.advance()
    s.check_invariants()
    st = s.stats()
    assert st.pages_used == 0 and st.num_waiting == 0 and st.num_running == 0
