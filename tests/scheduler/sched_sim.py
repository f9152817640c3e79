"""Test harness: drives the C++ scheduler (and optionally the Python oracle in lockstep)
with a fake executor that plays the GPU.

The fake executor keeps a KV store of token ids (page, offset) -> token. Every plan is
"executed" the moment it is issued (as the GPU would run it next): for each entry it
checks that every KV position the entry attends to ([0, prefix_len)) holds exactly the
request's token at that position, read through the plan's block table, then writes the
entry's inputs. That one check covers cache hits, chunking, retraction, overlap (-1 inputs
filled from the previous step's output) and speculative slots: a wrong page id, a wrong
hit or a stale page would put a wrong token under some position.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np

from tokenspeed_engine.scheduler import Scheduler, SchedulerConfig
from tokenspeed_engine.scheduler.oracle import OracleScheduler

PLAN_FIELDS = ("request_ids", "slots", "prefix_lens", "extend_lens", "sample", "input_ids", "positions")


class FakeExecutor:
    def __init__(self, cfg: SchedulerConfig, rng: random.Random, accept_p: float, eos_p: float, stop_fn=None) -> None:
        self.P, self.w = cfg.page_size, cfg.decode_width
        self.stop_fn = stop_fn  # (rid, tokens so far) -> True when the request emits EOS
        self.kv = np.full((cfg.num_pages, cfg.page_size), -7, dtype=np.int64)
        self.seq: dict[int, list[int]] = {}  # executor's view: prompt + every token it produced
        self.rng, self.accept_p, self.eos_p = rng, accept_p, eos_p

    def submit(self, rid: int, tokens: list[int]) -> None:
        self.seq[rid] = list(tokens)

    def execute(self, plan) -> tuple[list[tuple[int, list[int]]], list[int]]:
        bt = np.array(plan.block_table)  # copied at launch, as a real executor would
        outputs, eos = [], []
        off = 0
        for i in range(len(plan.request_ids)):
            rid, slot = int(plan.request_ids[i]), int(plan.slots[i])
            prefix, ext, sample = int(plan.prefix_lens[i]), int(plan.extend_lens[i]), bool(plan.sample[i])
            inputs = [int(x) for x in plan.input_ids[off : off + ext]]
            positions = [int(x) for x in plan.positions[off : off + ext]]
            off += ext
            seq = self.seq[rid]
            assert positions == list(range(prefix, prefix + ext)), (rid, positions, prefix)
            for p in range(prefix):  # everything attended to is the right token
                page = bt[slot, p // self.P]
                assert page != 0, f"request {rid}: position {p} maps to the null page"
                got = int(self.kv[page, p % self.P])
                assert got == seq[p], f"request {rid}: KV at position {p} (page {page}) is {got}, want {seq[p]}"
            is_draft_decode = sample and self.w > 1 and ext == self.w and all(x == -1 for x in inputs[1:])
            known = ext if not is_draft_decode else 1
            for j in range(known):
                if inputs[j] == -1:  # overlap: the previous step's output
                    assert prefix + j < len(seq), f"request {rid}: input at {prefix + j} is unknown to the executor"
                    inputs[j] = seq[prefix + j]
                else:
                    assert inputs[j] == seq[prefix + j], f"request {rid}: wrong input at {prefix + j}"
            out: list[int] = []
            if sample:
                truth = [self.rng.randrange(0, 6) for _ in range(self.w if is_draft_decode else 1)]
                if is_draft_decode:  # drafts d_j: right with probability accept_p
                    for j in range(1, self.w):
                        inputs[j] = truth[j - 1] if self.rng.random() < self.accept_p else truth[j - 1] + 6
                    n = 1
                    while n < self.w and inputs[n] == truth[n - 1]:
                        n += 1
                    truth = truth[:n]
                out = truth
            for j, p in enumerate(positions):
                self.kv[bt[slot, p // self.P], p % self.P] = inputs[j]
            if sample:
                seq.extend(out)
                outputs.append((rid, out))
                if self.stop_fn(rid, seq) if self.stop_fn else self.rng.random() < self.eos_p:
                    eos.append(rid)
        return outputs, eos


def assert_plans_equal(a, b) -> None:
    assert a.step == b.step
    for f in PLAN_FIELDS:
        x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
        assert x.tolist() == y.tolist(), f"plan {a.step} differs in {f}: C++ {x.tolist()} oracle {y.tolist()}"
    assert np.array_equal(np.asarray(a.block_table), np.asarray(b.block_table)), f"block tables differ at {a.step}"


class Driver:
    """Submits, plans, executes and advances; the oracle (if any) gets the same calls."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        seed: int = 0,
        oracle: bool = True,
        accept_p: float = 0.6,
        eos_p: float = 0.0,
        check_every_step: bool = True,
        stop_fn=None,
    ) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.cpp = Scheduler(cfg)
        self.ref = OracleScheduler(cfg) if oracle else None
        self.exec = FakeExecutor(cfg, random.Random(seed + 1), accept_p, eos_p, stop_fn)
        self.inflight: deque = deque()
        self.live: set[int] = set()
        self.tokens: dict[int, list[int]] = {}  # the scheduler's view, mirrored
        self.max_new: dict[int, int] = {}
        self.prompt_len: dict[int, int] = {}
        self.final: dict[int, tuple[list[int], str]] = {}  # finished rid -> (tokens, reason)
        self.admissions: list[tuple[int, int]] = []  # (rid, prefix hit tokens) per admission
        self.resident: set[int] = set()
        self.check_every_step = check_every_step

    # -- calls --------------------------------------------------------------------------
    def submit(self, rid: int, tokens: list[int], max_new: int) -> bool:
        errors = []
        for s in (self.cpp, self.ref):
            if s is None:
                continue
            try:
                s.submit(rid, tokens, max_new)
                errors.append(None)
            except ValueError as e:
                errors.append(type(e))
        assert len(set(errors)) == 1, f"submit disagrees: {errors}"
        if errors[0] is not None:
            return False
        self.live.add(rid)
        self.tokens[rid], self.max_new[rid], self.prompt_len[rid] = list(tokens), max_new, len(tokens)
        self.exec.submit(rid, tokens)
        return True

    def plan(self):
        plan = self.cpp.next_plan()
        if self.ref is not None:
            assert_plans_equal(plan, self.ref.next_plan())
        self._note_admissions(plan)
        outputs, eos = self.exec.execute(plan)
        self.inflight.append((plan, outputs, eos))
        self.check()
        return plan

    def advance(self, aborts: list[int] = (), drop_dead_events: bool = False):
        plan, outputs, eos = self.inflight.popleft()
        events = [(rid, toks) for rid, toks in outputs if not (drop_dead_events and rid not in self.live)]
        for rid, toks in events:  # mirror the scheduler's rule: tokens of live requests, capped
            if rid in self.live:
                room = self.max_new[rid] - (len(self.tokens[rid]) - self.prompt_len[rid])
                self.tokens[rid].extend(toks[:room])
        done = self.cpp.advance(events, eos, list(aborts))
        if self.ref is not None:
            assert done == self.ref.advance(events, eos, list(aborts)), "advance results differ"
        for rid, reason in done:
            self.live.discard(rid)
            self.resident.discard(rid)
            self.final[rid] = (self.tokens[rid], reason)
        self.check()
        return done

    def abort(self, rid: int) -> bool:
        got = self.cpp.abort(rid)
        if self.ref is not None:
            assert got == self.ref.abort(rid)
        if got:
            self.live.discard(rid)
            self.resident.discard(rid)
            self.final[rid] = (self.tokens[rid], "abort")
        self.check()
        return got

    # -- checks -------------------------------------------------------------------------
    def _note_admissions(self, plan) -> None:
        """At each admission, the hit pages hold exactly the request's leading tokens."""
        P = self.cfg.page_size
        for i, rid in enumerate(plan.request_ids.tolist()):
            if rid in self.resident:
                continue
            hit, slot = int(plan.prefix_lens[i]), int(plan.slots[i])
            self.admissions.append((rid, hit))
            for k in range(hit // P):
                page = int(plan.block_table[slot, k])
                assert self.cpp.cached_page_tokens(page) == self.tokens[rid][k * P : (k + 1) * P]
        self.resident = {r for r in self.live if self.cpp.request_info(r)["slot"] >= 0}

    def check(self) -> None:
        s = self.cpp.stats()
        assert s.pages_used + s.pages_free + s.pages_cached == s.pages_total
        if not self.check_every_step:
            return
        self.cpp.check_invariants()
        for rid in self.live:
            info = self.cpp.request_info(rid)
            assert info["tokens"] == self.tokens[rid], f"request {rid}: tokens differ from the mirror"
        if self.ref is not None:
            self.ref.check_invariants()
            assert s.as_dict() == vars(self.ref.stats()), f"stats differ: {s.as_dict()} vs {vars(self.ref.stats())}"

    def drain(self, max_iters: int = 10_000) -> None:
        """Steps (no overlap) until every request has finished and no plan is in flight."""
        for _ in range(max_iters):
            if not self.live and not self.inflight:
                return
            if self.inflight:
                self.advance()
            else:
                self.plan()
        raise AssertionError("scheduler made no progress (livelock?)")

    def assert_all_pages_back(self) -> None:
        s = self.cpp.stats()
        assert s.pages_used == 0 and s.num_running == 0 and s.num_waiting == 0
        assert s.pages_free + s.pages_cached == s.pages_total
        if not self.cfg.enable_prefix_cache:
            assert s.pages_free == s.pages_total
        assert not np.asarray(self.cpp.block_table).any(), "block table rows left behind"
