"""A 10-turn agent conversation resubmitted turn by turn reuses the whole previous turn.

Turn t's prompt is turn t-1's full token sequence (its prompt and every generated token)
followed by a new user message. The prefix cache must serve every token of the previous
turns; only tokens whose KV was never computed are recomputed:
  * in the engine's overlap loop, a request that stops on EOS already has its final token
    fed by the step in flight, so the hit is the whole previous turn (page-granular);
  * without overlap, or when the request stops on max_new_tokens (then it is not
    scheduled again), the final sampled token never went through the model, so it is
    recomputed along with the new message.
The last prompt token is always recomputed (here it belongs to the new message).
The fake executor checks that every hit page holds exactly the expected tokens.
"""

from __future__ import annotations

import random

import pytest

from tokenspeed_engine.scheduler import SchedulerConfig

from .sched_sim import Driver

TURNS = 10


def converse(page_size: int, overlap: bool, finish_by: str, decode_width: int = 1):
    rng = random.Random(page_size * 10 + overlap)
    gen_len = {t: rng.randrange(5, 40) for t in range(TURNS)}
    cfg = SchedulerConfig(
        num_pages=4096 // page_size + 64,
        page_size=page_size,
        max_num_batched_tokens=64,
        max_running_requests=4,
        decode_width=decode_width,
        max_context_len=4096,
    )
    stop = (lambda rid, seq: len(seq) - prompt_len[rid] >= gen_len[rid]) if finish_by == "eos" else None
    prompt_len: dict[int, int] = {}
    d = Driver(cfg, seed=page_size, oracle=True, stop_fn=stop, accept_p=0.7)
    history: list[int] = []
    results = []
    for turn in range(TURNS):
        prompt = history + [rng.randrange(1000) for _ in range(rng.randrange(10, 60))]
        prompt_len[turn] = len(prompt)
        max_new = gen_len[turn] if finish_by == "length" else gen_len[turn] + 100
        assert d.submit(turn, prompt, max_new)
        while turn in d.live or d.inflight:
            if turn in d.live and (not d.inflight or (overlap and len(d.inflight) < 2)):
                d.plan()
            else:
                d.advance()
        hit = next(h for rid, h in d.admissions if rid == turn)
        results.append((len(history), hit))
        tokens, reason = d.final[turn]
        assert reason == ("stop" if finish_by == "eos" else "length")
        history = tokens
        assert len(history) >= len(prompt) + 1
    d.assert_all_pages_back()
    return results


@pytest.mark.parametrize("page_size", [1, 16])
def test_overlap_eos_hits_every_previous_token(page_size):
    for turn, (prev_len, hit) in enumerate(converse(page_size, overlap=True, finish_by="eos")):
        # Every token of all previous turns, prompt and generated, rounded down to pages.
        assert hit == prev_len // page_size * page_size, (turn, prev_len, hit)
        if page_size == 1:
            assert hit == prev_len


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("overlap,finish_by", [(False, "eos"), (False, "length"), (True, "length")])
def test_unfed_final_token_is_the_only_miss(page_size, overlap, finish_by):
    for turn, (prev_len, hit) in enumerate(converse(page_size, overlap=overlap, finish_by=finish_by)):
        expected = max(prev_len - 1, 0) // page_size * page_size
        assert hit == expected, (turn, prev_len, hit)


def test_speculative_decoding_multiturn():
    for turn, (prev_len, hit) in enumerate(converse(4, overlap=False, finish_by="eos", decode_width=3)):
        assert hit == max(prev_len - 1, 0) // 4 * 4, (turn, prev_len, hit)
