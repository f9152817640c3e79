"""Engine loop over the real scheduler: tokens, stops, lengths, aborts, seeds, page accounting."""

from __future__ import annotations

import pytest

from tests.engine.toy_model import ByteTokenizer, expected_text, toy_engine
from tokenspeed_engine.sampling import SamplingParams


def run_all(engine, max_steps: int = 10_000) -> dict[int, list]:
    outs: dict[int, list] = {}
    for _ in range(max_steps):
        if engine.num_unfinished() == 0:
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not finish")


def text_of(outs) -> str:
    return "".join(o.text for o in outs)


def test_greedy_tokens_follow_the_model_exactly() -> None:
    engine = toy_engine()
    tok = ByteTokenizer()
    prompts = {i: tok.encode(f"prompt number {i} " * (1 + i % 3)) for i in range(10)}
    for rid, p in prompts.items():
        engine.add_request(rid, p, SamplingParams(max_tokens=5 + rid, temperature=0.0))
    outs = run_all(engine)
    for rid, p in prompts.items():
        assert text_of(outs[rid]) == expected_text(p, 5 + rid)
        assert outs[rid][-1].finish_reason == "length" and outs[rid][-1].completion_tokens == 5 + rid
    stats = engine.scheduler.stats()
    assert stats.pages_used == 0 and stats.pages_free + stats.pages_cached == stats.pages_total


def test_eos_and_stop_strings() -> None:
    engine = toy_engine(eos_at=12)
    p = ByteTokenizer().encode("abcdefgh")  # EOS once the position reaches 12: 4 tokens
    engine.add_request(1, p, SamplingParams(max_tokens=50, temperature=0.0))
    full = expected_text(p, 50)
    engine.add_request(2, ByteTokenizer().encode("abcdefgh"), SamplingParams(max_tokens=50, temperature=0.0, stop=[full[2:4]]))
    outs = run_all(engine)
    assert text_of(outs[1]) == expected_text(p, 50, eos_at=12) and outs[1][-1].finish_reason == "stop"
    assert text_of(outs[2]) == full[:2] and outs[2][-1].finish_reason == "stop"


def test_ignore_eos_runs_to_max_tokens() -> None:
    engine = toy_engine(eos_at=10)
    engine.add_request(1, [97] * 8, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    outs = run_all(engine)
    assert outs[1][-1].finish_reason == "length" and outs[1][-1].completion_tokens == 6


def test_seeded_sampling_is_reproducible_and_independent_of_batch() -> None:
    def sample_alone(extra: int) -> str:
        engine = toy_engine()
        params = SamplingParams(max_tokens=8, temperature=5.0, top_k=20, seed=1234)
        engine.add_request(1, [100, 101, 102], params)
        for i in range(extra):
            engine.add_request(10 + i, [98] * (3 + i), SamplingParams(max_tokens=4, temperature=1.0))
        return text_of(run_all(engine)[1])

    assert sample_alone(0) == sample_alone(3)


def test_abort_returns_pages() -> None:
    engine = toy_engine()
    engine.add_request(1, [99] * 40, SamplingParams(max_tokens=100, temperature=0.0))
    engine.add_request(2, [98] * 10, SamplingParams(max_tokens=3, temperature=0.0))
    engine.step()
    engine.step()
    engine.abort(1)
    outs = run_all(engine)
    assert outs[1][-1].finish_reason == "abort"
    stats = engine.scheduler.stats()
    assert stats.pages_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_second_turn_hits_the_prefix_cache() -> None:
    engine = toy_engine()
    tok = ByteTokenizer()
    turn1 = tok.encode("system: you are helpful. user: hello there, how are you today?")
    engine.add_request(1, turn1, SamplingParams(max_tokens=8, temperature=0.0))
    first = run_all(engine)[1]
    turn2 = turn1 + tok.encode(text_of(first)) + tok.encode(" user: and now?")
    engine.add_request(2, turn2, SamplingParams(max_tokens=4, temperature=0.0))
    second = run_all(engine)[2]
    page = engine.runner.page_size
    assert second[-1].cached_tokens >= (len(turn1) + 8 - 1) // page * page - page
    assert second[-1].cached_tokens > 0


@pytest.mark.parametrize(
    "params,pattern",
    [
        (SamplingParams(max_tokens=0), "max_tokens must be a positive integer"),
        (SamplingParams(max_tokens=10**6), "exceeds the limit"),
        (SamplingParams(temperature=-1.0), "temperature must be in"),
        (SamplingParams(top_p=0.0), "top_p must be in"),
        (SamplingParams(top_k=-5), "top_k must be an integer >= -1"),
        (SamplingParams(min_p=2.0), "min_p must be in"),
        (SamplingParams(stop_token_ids=[10**6]), "stop_token_ids must be token ids"),
    ],
)
def test_invalid_params_are_rejected(params, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        toy_engine().add_request(1, [97, 98], params)


def test_prompt_longer_than_context_is_rejected() -> None:
    with pytest.raises(ValueError, match="this model's context is 64"):
        toy_engine(max_model_len=64).add_request(1, [97] * 64, SamplingParams())
