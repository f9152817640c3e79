"""The agentic trace generator, the JSONL formats and the prompt chain of a replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.serving.client import ConversationReplay, Endpoint, StreamResult
from benchmarks.serving.trace import (
    Conversation,
    TokenSynth,
    TraceConfig,
    Turn,
    generate_trace,
    read_trace_file,
    trace_stats,
    workload_shape,
    write_trace_file,
)


def test_generator_is_deterministic_per_conversation() -> None:
    cfg = TraceConfig(seed=11)
    a, b = generate_trace(cfg, 20), generate_trace(cfg, 20)
    assert a == b
    assert generate_trace(cfg, 5, start=7) == a[7:12]  # conversation i does not depend on the others
    assert generate_trace(TraceConfig(seed=12), 20) != a


def test_swe_smith_shape_statistics() -> None:
    convs = generate_trace(TraceConfig(seed=3), 400)
    turns = np.array([len(c.turns) for c in convs])
    assert turns.min() >= 10 and turns.max() <= 15 and set(turns) == set(range(10, 16))
    assert abs(turns.mean() - 12.5) < 0.3
    first = np.array([c.turns[0].new_input_tokens for c in convs])
    later = np.array([t.new_input_tokens for c in convs for t in c.turns[1:]])
    assert abs(first.mean() / 50_000 - 1) < 0.03 and first.std() / first.mean() > 0.08  # lognormal, sigma 0.15
    assert abs(later.mean() / 800 - 1) < 0.05
    assert {t.output_tokens for c in convs for t in c.turns} == {500}
    stats = trace_stats(convs)
    assert stats["conversations"] == 400 and stats["turns_min"] == 10
    # ideal reuse: a turn's prompt is all cached but its new tokens; a 50K start and ~1.3K per later turn
    assert 85 < stats["ideal_prefix_hit_pct"] < 99


def test_length_scale_and_max_context() -> None:
    small = generate_trace(TraceConfig(seed=1, length_scale=0.01), 200)
    assert abs(np.mean([c.turns[0].new_input_tokens for c in small]) / 500 - 1) < 0.05
    assert {t.output_tokens for c in small for t in c.turns} == {5}
    capped = generate_trace(TraceConfig(seed=1, max_context=60_000), 50)
    for c in capped:
        assert sum(t.new_input_tokens + t.output_tokens for t in c.turns) <= 60_000 and c.turns
    with pytest.raises(ValueError, match="max_turns"):
        generate_trace(TraceConfig(min_turns=5, max_turns=4), 1)
    with pytest.raises(ValueError, match="length_scale"):
        generate_trace(TraceConfig(length_scale=0), 1)


def test_lengths_file_round_trip(tmp_path) -> None:
    convs = generate_trace(TraceConfig(seed=5, shared_prefix_tokens=1000, length_scale=0.1), 7)
    path = tmp_path / "trace.jsonl"
    write_trace_file(path, convs)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"id", "shared_prefix_id", "shared_prefix_tokens", "turns"}
    assert set(first["turns"][0]) == {"new_input_tokens", "output_tokens"}
    assert read_trace_file(path) == convs


def test_messages_file_and_errors(tmp_path) -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1", "output_tokens": 7},
        {"role": "tool", "content": "t"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "u3"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"id": "c", "messages": msgs}) + "\n\n" + json.dumps({"turns": [{"new_input_tokens": 3, "output_tokens": 2}]})
    )
    chat, lengths = read_trace_file(path, default_output_tokens=9)
    assert chat.message_ends == (2, 4, 6) and [t.output_tokens for t in chat.turns] == [7, 9, 9]
    assert all("output_tokens" not in m for m in chat.messages)
    assert lengths.turns == (Turn(3, 2),) and lengths.id == "m-3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": [{"new_input_tokens": 3, "output_tokens": 0}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 turn 0: 'output_tokens' must be an integer >= 1"):
        read_trace_file(bad)
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="needs 'turns'"):
        read_trace_file(bad)
    with pytest.raises(FileNotFoundError, match="--trace-file"):
        read_trace_file(tmp_path / "missing.jsonl")


def test_token_synth_shared_prefix_and_salts() -> None:
    synth = TokenSynth(seed=0, low=5, high=50)
    a = Conversation("a", (Turn(30, 4), Turn(6, 4)), shared_prefix_tokens=10, shared_prefix_id="sys")
    b = Conversation("b", (Turn(20, 4),), shared_prefix_tokens=10, shared_prefix_id="sys")
    ta, tb = synth.new_tokens(a, 0, "r0"), synth.new_tokens(b, 0, "r0")
    assert len(ta) == 30 and len(tb) == 20 and ta[:10] == tb[:10] and ta[10:20] != tb[10:]
    assert synth.new_tokens(a, 0, "r1")[:10] == ta[:10] and synth.new_tokens(a, 0, "r1")[10:] != ta[10:]
    assert synth.new_tokens(a, 1, "r0") == TokenSynth(0, 5, 50).new_tokens(a, 1, "r0")
    assert all(5 <= t < 50 for t in ta)
    with pytest.raises(ValueError, match="empty"):
        TokenSynth(0, 10, 10)


def test_workload_shape_by_hand() -> None:
    # turn 0: 100 new (20 of them a shared, cached prefix), 10 out; turn 1: 30 new, 10 out
    c = Conversation("x", (Turn(100, 10), Turn(30, 10)), shared_prefix_tokens=20)
    w = workload_shape([c])
    assert w.prefill_tokens_per_output == pytest.approx((80 + 30) / 20)
    pairs = (80 * 20 + 80 * 81 / 2) + (30 * 110 + 30 * 31 / 2)
    assert w.prefill_pairs_per_output == pytest.approx(pairs / 20)
    ctx = (100 * 10 + 45) + (140 * 10 + 45)  # prompt * out + 0 + 1 + ... + 9 for each turn
    assert w.mean_decode_context == pytest.approx(ctx / 20)
    assert w.max_context == 150


def test_replay_prompt_chain_feeds_outputs_back() -> None:
    conv = Conversation("c", (Turn(8, 3), Turn(4, 3), Turn(5, 3)))
    synth = TokenSynth(1, 1, 100)
    ep = Endpoint("http://unused", "m")
    r = ConversationReplay(conv, "s", synth, ep, None, start_turn=0)
    body0, new0 = r.body(0)
    assert body0["prompt"] == new0 and body0["max_tokens"] == 3 and body0["ignore_eos"] and body0["stream"]
    r.record_output(0, new0, StreamResult("abc", [7, 8, 9]), 3)
    body1, new1 = r.body(1)
    assert body1["prompt"] == new0 + [7, 8, 9] + new1
    r.record_output(1, new1, StreamResult("", None), 3)  # no ids, no tokenizer: stand-ins of the same length
    body2, new2 = r.body(2)
    assert body2["prompt"][: len(body1["prompt"])] == body1["prompt"] and len(body2["prompt"]) == 8 + 3 + 4 + 3 + 5
    assert r.feedback == {"server_ids": 1, "retokenized": 0, "placeholder": 1}
    staggered = ConversationReplay(conv, "s", synth, ep, None, start_turn=2)
    assert staggered.body(2)[0]["prompt"][:8] == new0 and len(staggered.body(2)[0]["prompt"]) == 23
