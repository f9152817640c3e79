"""TokenSpeed scheduler: the C++20 control plane, bound as ``tokenspeed_engine._scheduler``.

This module is a thin typed wrapper. The policy (FCFS, decode first, chunked prefill under
a token budget, retraction of the newest request when pages run out, one-step overlap)
is described in ``csrc/scheduler/README.md``; ``tokenspeed_engine.scheduler.oracle`` is a
pure-Python implementation of the same policy used as a test oracle.

Typical executor loop (with one-step overlap)::

    sched = Scheduler(SchedulerConfig(num_pages=..., page_size=64))
    sched.submit(rid, prompt_ids, max_new_tokens=256)
    plan = sched.next_plan()                 # step N
    launch(plan)                             # copy arrays + plan.block_table to the GPU
    while True:
        nxt = sched.next_plan()              # step N+1, planned while N runs
        launch(nxt)                          # -1 inputs are filled from step N's output
        done = sched.advance(outputs_of(plan))
        plan = nxt
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tokenspeed_engine import _scheduler as _C  # a plain pybind11 module: no torch needed

IllegalTransitionError = _C.IllegalTransitionError
Plan = _C.Plan  # step, request_ids, slots, prefix_lens, extend_lens, sample, input_ids, positions, block_table
Stats = _C.Stats
NULL_PAGE: int = _C.NULL_PAGE
MAX_INFLIGHT_PLANS: int = _C.MAX_INFLIGHT_PLANS

TokenIds = Sequence[int] | np.ndarray
Events = Mapping[int, TokenIds] | Iterable[tuple[int, TokenIds]]

__all__ = [
    "IllegalTransitionError",
    "MAX_INFLIGHT_PLANS",
    "NULL_PAGE",
    "Plan",
    "Scheduler",
    "SchedulerConfig",
    "Stats",
]


@dataclass(frozen=True)
class SchedulerConfig:
    """Pool geometry and planner budgets (see csrc/scheduler/config.h)."""

    num_pages: int = 1024  # KV pages including the reserved null page 0
    page_size: int = 16  # tokens per page; prefix-cache granularity
    max_num_batched_tokens: int = 8192  # per-step budget: decode tokens + prefill chunk tokens
    max_running_requests: int = 256  # requests holding a slot / block-table row
    decode_width: int = 1  # 1 + speculative draft tokens reserved per decode
    enable_prefix_cache: bool = True
    max_context_len: int = 65536  # longest KV extent of one request; block-table width

    @property
    def max_pages_per_req(self) -> int:
        return -(-self.max_context_len // self.page_size)

    def to_native(self) -> _C.SchedulerConfig:
        return _C.SchedulerConfig(**asdict(self))


class Scheduler:
    """The C++ scheduler. Errors: ValueError for bad arguments, RuntimeError for calls out
    of order, IllegalTransitionError (a RuntimeError) for an illegal FSM event."""

    def __init__(self, config: SchedulerConfig | None = None, **overrides: object) -> None:
        config = config or SchedulerConfig()
        if overrides:
            config = SchedulerConfig(**{**asdict(config), **overrides})
        self.config = config
        self._core = _C.Scheduler(config.to_native())

    def submit(self, request_id: int, tokens: TokenIds, max_new_tokens: int) -> None:
        """Queue a request. Token ids are >= 0; the request may generate max_new_tokens."""
        self._core.submit(request_id, tokens, max_new_tokens)

    def next_plan(self) -> Plan:
        """Plan the next step. At most two plans may be in flight (one-step overlap)."""
        return self._core.next_plan()

    def advance(self, events: Events = (), finished: Iterable[int] = (), aborted: Iterable[int] = ()) -> list[tuple[int, str]]:
        """Report the oldest plan in flight: ``events`` maps each token-producing request
        of that plan to its new tokens (1 for a last prefill chunk, 1..decode_width for a
        decode); ``finished`` lists requests that stopped (EOS) with these tokens;
        ``aborted`` lists requests to drop. Returns ``[(request_id, reason), ...]`` for
        requests that finished ("stop", "length", "abort")."""
        return self._core.advance(events, list(finished), list(aborted))

    def advance_arrays(
        self,
        request_ids: np.ndarray,
        num_tokens: np.ndarray,
        tokens: np.ndarray,
        finished: Iterable[int] | None = None,
        aborted: Iterable[int] | None = None,
    ) -> list[tuple[int, str]]:
        """Same as advance() with flat arrays: num_tokens[i] of the concatenated tokens
        belong to request_ids[i]. The fast path for an executor holding tensors."""
        return self._core.advance_arrays(request_ids, num_tokens, tokens, finished, aborted)

    def abort(self, request_id: int) -> bool:
        """Finish a live request in any state; False if there is none with this id."""
        return self._core.abort(request_id)

    def stats(self) -> Stats:
        return self._core.stats()

    @property
    def block_table(self) -> np.ndarray:
        """Read-only int32 view [max_running_requests, max_pages_per_req], row = slot."""
        return self._core.block_table

    def has_request(self, request_id: int) -> bool:
        return self._core.has_request(request_id)

    def request_info(self, request_id: int) -> dict:
        return self._core.request_info(request_id)

    def cached_page_tokens(self, page: int) -> list[int]:
        return self._core.cached_page_tokens(page)

    def check_invariants(self) -> None:
        """Raise RuntimeError if any internal invariant is broken (tests)."""
        self._core.check_invariants()
