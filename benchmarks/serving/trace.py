"""Multi-turn coding-agent traces: a seeded SWE-smith-shaped generator and two JSONL input formats.

A conversation is a list of turns; turn t sends the previous prompt + the previous output +
``new_input_tokens`` fresh tokens and asks for ``output_tokens`` tokens. Its prompts form one
path in a token trie (each prompt extends the last), so a prefix cache can serve everything
but the new tokens; conversations may also share a root (a system prompt: ``shared_prefix``).

The ``tokenspeed-trie`` lengths format (JSONL, one conversation per line)::

    {"id": "swe-0", "shared_prefix_id": "system", "shared_prefix_tokens": 0,
     "turns": [{"new_input_tokens": 50213, "output_tokens": 500}, {"new_input_tokens": 811, "output_tokens": 500}]}

``id``, ``shared_prefix_id`` and ``shared_prefix_tokens`` are optional; the shared prefix is the
first ``shared_prefix_tokens`` of turn 1's new tokens, identical in every conversation with the
same ``shared_prefix_id``. OpenAI messages (JSONL): ``{"id": ..., "messages": [...]}``; every
assistant message ends a turn (its request is the messages before it; its length in tokens,
when known, is an optional ``"output_tokens"`` key on that message); non-assistant messages
after the last assistant one form a final turn. The two kinds may be mixed in one file.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRIE_FORMAT = "tokenspeed-trie"


@dataclass(frozen=True)
class Turn:
    new_input_tokens: int  # fresh tokens appended this turn (0 when unknown: messages input)
    output_tokens: int


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    shared_prefix_tokens: int = 0
    shared_prefix_id: str = "default"
    # OpenAI messages input: the messages, and for each turn the index one past its last request message
    messages: tuple[dict, ...] | None = None
    message_ends: tuple[int, ...] = ()

    def context_before(self, turn: int) -> int:
        """Prompt length of turn ``turn`` minus its new tokens (the cacheable part), lengths input only."""
        return sum(t.new_input_tokens + t.output_tokens for t in self.turns[:turn])


@dataclass
class TraceConfig:
    """The SWE-smith shape: a ~50K first turn (repository context), ~800 new tokens per later turn
    (tool output), 10-15 turns, 500 output tokens. Lengths are lognormal around the given means."""

    first_turn_tokens: int = 50_000
    first_turn_spread: float = 0.15  # sigma of the lognormal (0: every first turn the same)
    later_turn_tokens: int = 800
    later_turn_spread: float = 0.5
    min_turns: int = 10
    max_turns: int = 15
    output_tokens: int = 500
    shared_prefix_tokens: int = 0
    length_scale: float = 1.0  # multiplies every length above (CPU runs: 0.01)
    max_context: int | None = None  # drop turns whose prompt + output would not fit
    seed: int = 0

    def validate(self) -> None:
        for name in ("first_turn_tokens", "later_turn_tokens", "output_tokens", "min_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_turns < self.min_turns:
            raise ValueError(f"max_turns ({self.max_turns}) must be >= min_turns ({self.min_turns})")
        for name in ("first_turn_spread", "later_turn_spread"):
            if not 0 <= getattr(self, name) <= 3:
                raise ValueError(f"{name} must be in [0, 3], got {getattr(self, name)}")
        if not self.length_scale > 0:
            raise ValueError(f"length_scale must be > 0, got {self.length_scale}")
        if self.shared_prefix_tokens < 0:
            raise ValueError(f"shared_prefix_tokens must be >= 0, got {self.shared_prefix_tokens}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")

    def scaled(self, n: int) -> int:
        return max(1, round(n * self.length_scale))


def _lognormal(rng: np.random.Generator, mean: float, sigma: float) -> int:
    """A draw with the given mean (the median is mean * exp(-sigma^2 / 2))."""
    if sigma == 0:
        return max(1, round(mean))
    return max(1, round(mean * math.exp(rng.normal(-0.5 * sigma * sigma, sigma))))


def generate_conversation(cfg: TraceConfig, index: int) -> Conversation:
    """Conversation ``index`` of the seeded trace: the same whatever else is generated."""
    rng = np.random.default_rng([cfg.seed, index])
    n_turns = int(rng.integers(cfg.min_turns, cfg.max_turns + 1))
    out = cfg.scaled(cfg.output_tokens)
    shared = min(cfg.scaled(cfg.shared_prefix_tokens), cfg.scaled(cfg.first_turn_tokens)) if cfg.shared_prefix_tokens else 0
    first = max(shared + 1, _lognormal(rng, cfg.scaled(cfg.first_turn_tokens), cfg.first_turn_spread))
    later = [_lognormal(rng, cfg.scaled(cfg.later_turn_tokens), cfg.later_turn_spread) for _ in range(n_turns - 1)]
    if cfg.max_context is not None:
        if out >= cfg.max_context:
            raise ValueError(f"output_tokens ({out}) leaves no room for a prompt in max_context {cfg.max_context}")
        first = min(first, cfg.max_context - out)
        shared = min(shared, first)
    turns, context = [], 0
    for new in [first, *later]:
        if cfg.max_context is not None and context + new + out > cfg.max_context:
            break
        turns.append(Turn(new, out))
        context += new + out
    return Conversation(f"swe-{cfg.seed}-{index}", tuple(turns), shared, "system")


def generate_trace(cfg: TraceConfig, count: int, start: int = 0) -> list[Conversation]:
    cfg.validate()
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [generate_conversation(cfg, i) for i in range(start, start + count)]


# ---- JSONL input / output -----------------------------------------------------------------
def _int_field(obj: dict, key: str, where: str, minimum: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _lengths_conversation(obj: dict, where: str, default_id: str) -> Conversation:
    turns_raw = obj["turns"]
    if not isinstance(turns_raw, list) or not turns_raw:
        raise ValueError(f"{where}: 'turns' must be a non-empty list")
    turns = []
    for i, t in enumerate(turns_raw):
        if not isinstance(t, dict):
            raise ValueError(f"{where}: turn {i} must be an object")
        turns.append(
            Turn(
                _int_field(t, "new_input_tokens", f"{where} turn {i}", 1), _int_field(t, "output_tokens", f"{where} turn {i}", 1)
            )
        )
    shared = _int_field(obj, "shared_prefix_tokens", where, 0) if "shared_prefix_tokens" in obj else 0
    if shared > turns[0].new_input_tokens:
        raise ValueError(f"{where}: shared_prefix_tokens ({shared}) exceeds turn 0's new_input_tokens")
    return Conversation(str(obj.get("id", default_id)), tuple(turns), shared, str(obj.get("shared_prefix_id", "default")))


def _messages_conversation(obj: dict, where: str, default_id: str, default_output: int) -> Conversation:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} needs a string 'role' and a string 'content'")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: the first message is an assistant message (nothing to request)")
    ends, turns = [], []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            n = m.get("output_tokens", default_output)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{where}: message {i} 'output_tokens' must be an integer >= 1, got {n!r}")
            ends.append(i)
            turns.append(Turn(0, n))
    if messages[-1]["role"] != "assistant":
        ends.append(len(messages))
        turns.append(Turn(0, default_output))
    clean = tuple({k: v for k, v in m.items() if k != "output_tokens"} for m in messages)
    return Conversation(str(obj.get("id", default_id)), tuple(turns), messages=clean, message_ends=tuple(ends))


def read_trace_file(path: str | Path, default_output_tokens: int = 500) -> list[Conversation]:
    """Conversations from a JSONL file of ``tokenspeed-trie`` lengths and/or OpenAI messages lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--trace-file {path}: no such file")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        default_id = f"{path.stem}-{lineno}"
        if "turns" in obj:
            out.append(_lengths_conversation(obj, where, default_id))
        elif "messages" in obj:
            out.append(_messages_conversation(obj, where, default_id, default_output_tokens))
        else:
            raise ValueError(f"{where}: a line needs 'turns' ({TRIE_FORMAT} lengths) or 'messages' (OpenAI)")
    if not out:
        raise ValueError(f"--trace-file {path}: no conversations")
    return out


def write_trace_file(path: str | Path, conversations: list[Conversation]) -> None:
    """Write lengths conversations in the ``tokenspeed-trie`` format (one JSON object per line)."""
    with open(path, "w") as f:
        for c in conversations:
            if c.messages is not None:
                raise ValueError(f"conversation {c.id} is OpenAI messages; only lengths conversations can be written")
            obj: dict[str, Any] = {"id": c.id}
            if c.shared_prefix_tokens:
                obj.update(shared_prefix_id=c.shared_prefix_id, shared_prefix_tokens=c.shared_prefix_tokens)
            obj["turns"] = [{"new_input_tokens": t.new_input_tokens, "output_tokens": t.output_tokens} for t in c.turns]
            f.write(json.dumps(obj) + "\n")


# ---- statistics (also what the roofline reads) ----------------------------------------------
@dataclass
class WorkloadShape:
    """What a roofline needs of a trace, per generated token (ideal prefix caching of prompts and outputs)."""

    mean_decode_context: float  # KV tokens a sequence attends to, averaged over generated tokens
    prefill_tokens_per_output: float  # uncached prompt tokens per generated token
    prefill_pairs_per_output: float  # causal (query, key) pairs of those prefills per generated token
    max_context: int  # the longest conversation's final context


def workload_shape(conversations: list[Conversation]) -> WorkloadShape:
    convs = [c for c in conversations if c.messages is None]
    if not convs:
        raise ValueError("the workload shape needs lengths conversations (not OpenAI messages)")
    out_total = ctx_weighted = prefill = pairs = 0.0
    max_ctx = 0
    for c in convs:
        context = 0
        for i, t in enumerate(c.turns):
            cached = context + (c.shared_prefix_tokens if i == 0 else 0)
            new = context + t.new_input_tokens - cached
            prefill += new
            pairs += new * cached + new * (new + 1) / 2
            prompt = context + t.new_input_tokens
            ctx_weighted += prompt * t.output_tokens + t.output_tokens * (t.output_tokens - 1) / 2
            out_total += t.output_tokens
            context = prompt + t.output_tokens
        max_ctx = max(max_ctx, context)
    mean_ctx = ctx_weighted / out_total
    return WorkloadShape(mean_ctx, prefill / out_total, pairs / out_total, max_ctx)


def trace_stats(conversations: list[Conversation]) -> dict[str, Any]:
    """Shape statistics of a trace (reported in the results JSON)."""
    turns = [len(c.turns) for c in conversations]
    stats: dict[str, Any] = {
        "conversations": len(conversations),
        "turns_mean": float(np.mean(turns)),
        "turns_min": int(min(turns)),
        "turns_max": int(max(turns)),
        "output_tokens_mean": float(np.mean([t.output_tokens for c in conversations for t in c.turns])),
    }
    lengths = [c for c in conversations if c.messages is None]
    if lengths:
        first = [c.turns[0].new_input_tokens for c in lengths]
        later = [t.new_input_tokens for c in lengths for t in c.turns[1:]]
        shape = workload_shape(lengths)
        total_prompt = sum(c.context_before(i) + t.new_input_tokens for c in lengths for i, t in enumerate(c.turns))
        ideal_cached = sum(
            c.context_before(i) + (c.shared_prefix_tokens if i == 0 else 0) for c in lengths for i in range(len(c.turns))
        )
        stats.update(
            first_turn_tokens_mean=float(np.mean(first)),
            first_turn_tokens_p50=float(np.median(first)),
            later_turn_tokens_mean=float(np.mean(later)) if later else 0.0,
            later_turn_tokens_p50=float(np.median(later)) if later else 0.0,
            mean_decode_context=shape.mean_decode_context,
            max_context=shape.max_context,
            prefill_tokens_per_output=shape.prefill_tokens_per_output,
            ideal_prefix_hit_pct=100.0 * ideal_cached / total_prompt,
        )
    return stats


# ---- token content ----------------------------------------------------------------------
def _key(text: str) -> int:
    return zlib.crc32(text.encode())


class TokenSynth:
    """Deterministic random token ids in [low, high): the same key gives the same ids in every process."""

    def __init__(self, seed: int, low: int, high: int) -> None:
        if not 0 <= low < high:
            raise ValueError(f"token id range [{low}, {high}) is empty (check --vocab-size / --min-token-id)")
        self.seed, self.low, self.high = seed, low, high

    def ids(self, key: tuple[int | str, ...], n: int) -> list[int]:
        seq = [self.seed] + [k if isinstance(k, int) else _key(k) for k in key]
        return np.random.default_rng(seq).integers(self.low, self.high, n).tolist()

    def shared_prefix(self, prefix_id: str, n: int) -> list[int]:
        return self.ids(("shared", prefix_id), n)

    def new_tokens(self, conv: Conversation, turn: int, salt: str) -> list[int]:
        """Turn ``turn``'s fresh ids; ``salt`` (run and use) keeps other runs' cache entries from matching."""
        t = conv.turns[turn]
        if turn == 0 and conv.shared_prefix_tokens:
            rest = t.new_input_tokens - conv.shared_prefix_tokens
            shared = self.shared_prefix(conv.shared_prefix_id, conv.shared_prefix_tokens)
            return shared + self.ids(("new", salt, conv.id, 0), rest)
        return self.ids(("new", salt, conv.id, turn), t.new_input_tokens)

    def placeholder_output(self, conv: Conversation, turn: int, salt: str, n: int) -> list[int]:
        """Stand-in ids for an output the client could not read back as ids."""
        return self.ids(("out", salt, conv.id, turn), n)
