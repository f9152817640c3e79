"""Fuzz: thousands of random accept / reject outcomes through the engine's speculative step and the
C++ scheduler; no KV page leaks, and every position a step attends to holds the right token.

The model is replaced by a fake decoder (a subclass of the real one overriding only the two model
calls): the planning, the split into verifies and chunks, the truncation at EOS / stop / length,
the reports to the scheduler (which rewinds past rejected drafts), aborts, retraction and the
prefix cache are the real code. The fake keeps a token-level copy of the KV cache: a verify
writes its input and *all* k drafts (accepted or not) into the reserved slots, as the GPU does,
and every step first checks that the positions it attends to hold the request's true tokens,
which fails if a rejected draft's slot were not rewritten before it is read.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.speculative.utils import IdTokenizer
from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.sampling import SamplingParams
from tokenspeed_engine.speculative import decoder as decoder_module
from tokenspeed_engine.speculative.stats import RequestSpecStats, SpecStats

ALPHABET = 6  # few distinct tokens: generated text repeats, so the prefix cache hits generated pages too


class FakeRunner:
    def __init__(self, num_pages: int, page_size: int, max_model_len: int) -> None:
        self.num_pages, self.page_size, self.max_model_len, self.vocab_size = num_pages, page_size, max_model_len, 64
        self.device = "cpu"


class FuzzDecoder(decoder_module.SpeculativeDecoder):
    rng: random.Random
    accept_p: float
    eos_p: float

    def __init__(self, runner, num_steps, max_running_requests, graph_max_bs=0):  # noqa: D107 - no model to load
        self.k = num_steps
        self.page_size = runner.page_size
        self.stats = SpecStats(num_steps)
        self.request_stats: dict[int, RequestSpecStats] = {}
        self._slot_of: dict[int, int] = {}
        self._first_probs: dict = {}
        self.kv = np.full((runner.num_pages, runner.page_size), -1, dtype=np.int64)
        self.verifies = 0

    def _truth(self, engine, rid: int) -> list[int]:
        return engine.scheduler.request_info(rid)["tokens"]  # prompt + every reported token

    def _check_attended(self, tokens: list[int], pages: np.ndarray, upto: int, rid: int) -> None:
        for p in range(upto):
            page = int(pages[p // self.page_size])
            assert page > 0, f"request {rid}: position {p} on the null page"
            got = int(self.kv[page, p % self.page_size])
            assert got == tokens[p], f"request {rid}: KV at {p} holds {got}, the sequence has {tokens[p]}"

    def _write(self, pages: np.ndarray, start: int, values: list[int]) -> None:
        for j, v in enumerate(values):
            p = start + j
            self.kv[int(pages[p // self.page_size]), p % self.page_size] = v

    def _token(self) -> int:
        return 0 if self.rng.random() < self.eos_p else self.rng.randrange(1, ALPHABET)

    def _decode(self, engine, rids, slots, start, last, pages):
        out = {}
        for b, rid in enumerate(rids.tolist()):
            tokens, P = self._truth(engine, rid), int(start[b])
            assert len(tokens) == P + 1 and tokens[P] == int(last[b]), f"request {rid}: verify input is not its last token"
            assert self._slot_of.get(rid) == int(slots[b]), f"request {rid}: verify without a draft from its last step"
            self._check_attended(tokens, pages[b], P, rid)
            n = 0
            while n < self.k and self.rng.random() < self.accept_p:
                n += 1
            emitted = [self._token() for _ in range(n + 1)]
            # rejected drafts differ from what the target emits there; later ones are arbitrary
            drafts = emitted[:n] + [emitted[n] + ALPHABET] + [self.rng.randrange(100, 200) for _ in range(self.k - n - 1)]
            self._write(pages[b], P, [int(last[b])] + drafts[: self.k])
            out[rid] = emitted
            s = self.request_stats.setdefault(rid, RequestSpecStats())
            s.verify_steps, s.accepted_tokens = s.verify_steps + 1, s.accepted_tokens + n
            self.verifies += 1
        self.stats.record([len(t) - 1 for t in out.values()])
        return out

    def _extend(self, engine, chunk, rids, slots, prefix, extend, ids, starts, pages, sample):
        out = {}
        for i in chunk:
            rid = int(rids[i])
            tokens, pre = self._truth(engine, rid), int(prefix[i])
            self._check_attended(tokens, pages[i], pre, rid)
            new = ids[starts[i] : starts[i + 1]].tolist()
            assert new == tokens[pre : pre + len(new)], f"request {rid}: chunk inputs differ from its tokens"
            self._write(pages[i], pre, new)
            if sample[i]:
                out[rid] = [self._token()]
                self._slot_of[rid] = int(slots[i])
        return out


def _check_reservations(engine: Engine, k: int) -> None:
    """A resident request holds exactly the pages its next verify needs: no page kept past a rollback."""
    sched = engine.scheduler
    P = sched.config.page_size
    for rid in list(engine._requests):
        info = sched.request_info(rid)
        if info["slot"] < 0 or info["state"] != "Decoding":
            continue
        assert len(info["pages"]) <= -(-(info["sched"] + k + 1) // P), info


@pytest.mark.parametrize("seed", range(6))
def test_random_accept_reject_sequences_leak_no_pages(monkeypatch, seed):
    rng = random.Random(seed)
    k = 1 + seed % 4
    page_size = rng.choice([1, 2, 4, 8])
    cache = seed % 2 == 0
    max_len = 96
    num_pages = -(-(max_len + k) // page_size) * 3 // 2 + 1  # room for one long request and a half: some retract
    monkeypatch.setattr(decoder_module, "SpeculativeDecoder", FuzzDecoder)
    config = EngineConfig(rng.randrange(k + 1, 40), rng.randrange(4, 9), enable_prefix_cache=cache, speculative_num_steps=k)
    engine = Engine(FakeRunner(num_pages, page_size, max_len), IdTokenizer(), {0}, config)
    dec: FuzzDecoder = engine.spec
    dec.rng, dec.accept_p, dec.eos_p = rng, rng.uniform(0.3, 0.9), 0.01
    start = engine.scheduler.stats()
    shared = [rng.randrange(1, ALPHABET) for _ in range(40)]
    rid, finished, steps = 0, 0, 0
    while dec.verifies < 4000 or engine.num_unfinished():
        if dec.verifies < 4000 and engine.num_unfinished() < 12 and rng.random() < 0.5:
            prompt = shared[: rng.randrange(0, 40)] + [rng.randrange(1, ALPHABET) for _ in range(rng.randrange(1, 10))]
            max_tokens = rng.randrange(1, max_len - len(prompt))
            stop = [rng.randrange(1, ALPHABET)] if rng.random() < 0.2 else []
            engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop))
            rid += 1
        if engine._requests and rng.random() < 0.02:
            engine.abort(rng.choice(list(engine._requests)))
        for out in engine.step():
            if out.finished:
                finished += 1
                assert out.completion_tokens <= 96
        steps += 1
        _check_reservations(engine, k)
        if steps % 50 == 0:
            engine.scheduler.check_invariants()
        assert steps < 50_000
    end = engine.scheduler.stats()
    assert finished == rid and dec.verifies >= 4000
    assert end.pages_used == 0 and end.num_running == end.num_waiting == 0
    assert end.pages_free + end.pages_cached == start.pages_free == end.pages_total
    if not cache:
        assert end.pages_free == start.pages_free  # the free count is back where it started
    assert end.num_retractions > 0, end.as_dict()
    engine.scheduler.check_invariants()
    assert not dec._slot_of  # draft state of finished requests is dropped
    print(
        f"k={k} page_size={page_size} cache={cache}: {dec.verifies} verifies, {steps} steps, {rid} requests, "
        f"mean acceptance length {dec.stats.mean_acceptance_length:.2f}, {end.num_retractions} retractions"
    )
