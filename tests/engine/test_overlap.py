"""One-step overlap: plan t+1 while step t runs; tokens are read back one step later.

The same requests must produce the same tokens with and without overlap (greedy, and
seeded sampling), stops and aborts must behave, and every page must come back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.tiny_models import VOCAB, engine_for, run_engine, runner_for, tiny_deepseek
from tests.engine.toy_model import EOS, ByteTokenizer, ToyRunner, expected_text
from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.overlap import DeviceSampler, fill_rows, resolve_input_ids
from tokenspeed_engine.sampling import Sampler, SamplingParams
from tokenspeed_engine.scheduler import Scheduler, SchedulerConfig


class OverlapToyRunner(ToyRunner):
    """The toy model, taking the engine's device input ids (the -1 inputs resolved)."""

    supports_overlap = True
    device = torch.device("cpu")

    def forward(self, plan, block_table, input_ids=None):
        if input_ids is not None:
            plan = _PlanWithIds(plan, input_ids.tolist())
        return super().forward(plan, block_table)


class _PlanWithIds:
    def __init__(self, plan, ids):
        self._plan, self.input_ids = plan, np.asarray(ids)

    def __getattr__(self, name):
        return getattr(self._plan, name)


def toy(overlap: bool, **kw) -> Engine:
    return Engine(OverlapToyRunner(**kw), ByteTokenizer(), {EOS}, EngineConfig(64, 16, enable_overlap=overlap))


def texts(outs: dict) -> dict[int, str]:
    return {rid: "".join(o.text for o in v) for rid, v in outs.items()}


def test_fill_rows_point_unknown_inputs_at_the_previous_steps_samples() -> None:
    s = Scheduler(SchedulerConfig(num_pages=64, page_size=4, max_num_batched_tokens=16, max_context_len=64))
    s.submit(1, [5, 6, 7], 4)
    s.submit(2, [8, 9], 4)
    first = s.next_plan()
    sampled = [int(r) for r in np.asarray(first.request_ids)[np.asarray(first.sample, dtype=bool)]]
    s.submit(3, [1, 2, 3, 4, 5], 4)
    second = s.next_plan()  # decodes of 1 and 2 (inputs unknown), then the prompt of 3
    ids = np.asarray(second.input_ids)
    rows = fill_rows(second, sampled)
    assert (ids < 0).sum() == 2 and ((rows >= 0) == (ids < 0)).all()
    prev = torch.tensor([40, 41])  # what step 1 sampled for requests [1, 2]
    got = resolve_input_ids(ids, rows, prev, torch.device("cpu")).tolist()
    assert got == [{1: 40, 2: 41}[r] for r in sampled] + [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="did not sample it"):
        fill_rows(second, [2])


def test_device_sampler_draws_what_the_host_sampler_draws() -> None:
    logits = torch.randn(5, 97, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=9, seed=3),
        SamplingParams(temperature=1.3, top_p=0.8, seed=4),
        SamplingParams(temperature=0.9, min_p=0.1, seed=5),
        SamplingParams(temperature=0.0),
    ]
    host, dev = Sampler(), DeviceSampler()
    for _ in range(3):  # the per-request generators advance the same way
        assert dev.sample_tensor(logits, list(range(5)), params).tolist() == host.sample(logits, list(range(5)), params)


def test_toy_model_under_overlap_matches_its_rule_exactly() -> None:
    tok = ByteTokenizer()
    prompts = {i: tok.encode(f"request {i} " * (1 + i % 4)) for i in range(12)}
    e = toy(True)
    for rid, p in prompts.items():
        e.add_request(rid, p, SamplingParams(max_tokens=3 + 2 * rid, temperature=0.0))
    outs = run_engine(e)
    for rid, p in prompts.items():
        assert texts(outs)[rid] == expected_text(p, 3 + 2 * rid)
        assert outs[rid][-1].finish_reason == "length" and outs[rid][-1].completion_tokens == 3 + 2 * rid
    s = e.scheduler.stats()
    assert s.pages_used == 0 and s.num_inflight_plans == 0 and s.pages_free + s.pages_cached == s.pages_total


def test_stops_and_aborts_under_overlap() -> None:
    tok = ByteTokenizer()
    p = tok.encode("abcdefgh")
    full = expected_text(p, 50)
    e = toy(True, eos_at=12)
    e.add_request(1, p, SamplingParams(max_tokens=50, temperature=0.0))
    e.add_request(2, p, SamplingParams(max_tokens=50, temperature=0.0, stop=[expected_text(p, 50, eos_at=12)[2:4]]))
    e.add_request(3, [99] * 30, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    e.add_request(4, p, SamplingParams(max_tokens=50, temperature=0.0, stop_token_ids=[ord(full[5])]))
    outs: dict[int, list] = {}
    for _ in range(6):
        for o in e.step():
            outs.setdefault(o.request_id, []).append(o)
    e.abort(3)
    for rid, v in run_engine(e).items():
        outs.setdefault(rid, []).extend(v)
    got = texts(outs)
    assert got[1] == expected_text(p, 50, eos_at=12) and outs[1][-1].finish_reason == "stop"
    assert got[2] == full[:2] and outs[2][-1].finish_reason == "stop"
    assert outs[3][-1].finish_reason == "abort" and 0 < outs[3][-1].completion_tokens < 200
    assert got[4] == full[:5] and outs[4][-1].finish_reason == "stop"
    s = e.scheduler.stats()
    assert s.pages_used == 0 and s.num_running == 0 and s.num_waiting == 0 and s.num_inflight_plans == 0


def test_eos_under_overlap_caches_the_whole_turn() -> None:
    """The stop token went through the model in the step in flight, so turn 2 hits every token of turn 1."""
    hits = {}
    for overlap in (False, True):
        e = toy(overlap, eos_at=40, page_size=1)
        turn1 = list(range(97, 117))
        e.add_request(1, turn1, SamplingParams(max_tokens=100, temperature=0.0))
        gen = sum((o.token_ids for o in run_engine(e)[1]), [])
        assert gen[-1] == EOS and len(gen) == 22  # positions 19..39 give letters, 40 EOS
        e.add_request(2, turn1 + gen + [120, 121], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        hits[overlap] = run_engine(e)[2][-1].cached_tokens
    assert hits[True] == 20 + 22 and hits[False] == 20 + 21  # without overlap EOS never reached the model


@pytest.fixture(scope="module")
def model():
    return tiny_deepseek(torch.float32)


def random_requests(seed: int, n: int, greedy: bool = True):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for rid in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
        if greedy:
            params = SamplingParams(max_tokens=int(torch.randint(1, 24, (1,), generator=g)), temperature=0.0)
        else:
            params = SamplingParams(max_tokens=10, temperature=1.5, top_k=50, seed=rid)
        reqs.append((rid, prompt, params))
    return reqs


def generate(model, reqs, overlap: bool, min_retractions: int = 0, **runner_kw) -> dict[int, list[int]]:
    runner = runner_for(model, **runner_kw)
    e = engine_for(runner, overlap, batched_tokens=32, running=8)  # chunked prefill, mixed steps
    for rid, prompt, params in reqs:
        e.add_request(rid, prompt, SamplingParams(**vars(params)))
    outs = run_engine(e)
    s = e.scheduler.stats()
    assert s.pages_used == 0 and s.num_inflight_plans == 0 and s.num_retractions >= min_retractions
    return {rid: sum((o.token_ids for o in v), []) for rid, v in outs.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_real_model_greedy_tokens_identical_with_and_without_overlap(model, seed) -> None:
    reqs = random_requests(seed, 20)
    serial, overlapped = generate(model, reqs, False), generate(model, reqs, True)
    assert serial == overlapped
    assert all(len(serial[rid]) == p.max_tokens or serial[rid][-1] == 0 for rid, _, p in reqs)


def test_real_model_overlap_survives_retraction(model) -> None:
    """A pool too small for the batch: requests are retracted and recomputed, output unchanged."""
    reqs = random_requests(7, 10)
    ample = generate(model, reqs, False)
    assert generate(model, reqs, True, min_retractions=1, num_pages=26) == ample
    assert generate(model, reqs, False, min_retractions=1, num_pages=26) == ample


def test_real_model_seeded_sampling_identical_with_and_without_overlap(model) -> None:
    reqs = random_requests(3, 6, greedy=False)
    assert generate(model, reqs, False) == generate(model, reqs, True)


def test_overlap_needs_a_runner_that_takes_device_ids() -> None:
    with pytest.raises(ValueError, match="enable_overlap needs a runner"):
        Engine(ToyRunner(), ByteTokenizer(), {EOS}, EngineConfig(enable_overlap=True))


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_step_releases_its_requests(overlap) -> None:
    class Flaky(OverlapToyRunner):
        fail_at = 4

        def forward(self, plan, block_table, input_ids=None):
            if self.steps + 1 == self.fail_at:
                self.steps += 1
                raise RuntimeError("device fault")
            return super().forward(plan, block_table, input_ids)

    e = Engine(Flaky(), ByteTokenizer(), {EOS}, EngineConfig(64, 16, enable_overlap=overlap))
    for rid in range(3):
        e.add_request(rid, [100 + rid] * 9, SamplingParams(max_tokens=30, temperature=0.0))
    with pytest.raises(RuntimeError, match="device fault"):
        for _ in range(10):
            e.step()
    s = e.scheduler.stats()
    assert s.num_inflight_plans == 0 and s.pages_used == 0 and s.num_running == 0
    e.add_request(9, [97, 98, 99], SamplingParams(max_tokens=4, temperature=0.0))  # the engine still serves
    assert texts(run_engine(e))[9] == expected_text([97, 98, 99], 4)
