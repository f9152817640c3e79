"""Replay conversations against an OpenAI-compatible endpoint with streaming, recording timestamps.

One run = ``concurrency`` slots (simulated users). Each slot takes the next conversation from a
shared queue and sends its turns one after another: turn t's prompt is turn t-1's prompt, then
turn t-1's output, then turn t's new tokens, so a prefix cache can serve all but the new part.
The output is fed back as the ids the server streamed (``token_ids`` in a chunk, as vLLM does
when asked with ``return_token_ids``), else as the re-tokenised text (``tokenizer``), else as
stand-in ids of the same length (then only the previous prompt can hit the cache).

``stagger``: a slot's first conversation starts at turn floor(slot * turns / concurrency)
(with the earlier turns' prompts and stand-in outputs as its context) so that the users are
not all at the same phase, as in a long-running service. Every request of a run carries a salt
in its fresh tokens, so one run never hits another run's cache entries (shared prefixes aside).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from benchmarks.serving.metrics import RequestRecord
from benchmarks.serving.progress import Progress
from benchmarks.serving.trace import Conversation, TokenSynth


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = None
    prompt_format: str = "ids"  # ids | text (lengths traces); messages traces always use chat
    temperature: float = 0.0
    request_token_ids: bool = True  # ask for the output ids (vLLM's return_token_ids); others ignore it
    ignore_eos: bool = True
    timeout_s: float = 600.0

    def validate(self) -> None:
        if self.prompt_format not in ("ids", "text"):
            raise ValueError(f"--prompt-format must be ids or text, got {self.prompt_format!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"--request-timeout must be > 0, got {self.timeout_s}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def fetch_model_name(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model /v1/models lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model-name")
    return str(data[0]["id"])


@dataclass
class StreamResult:
    text: str
    token_ids: list[int] | None  # None unless every token came back as an id


async def stream_request(
    client: httpx.AsyncClient, ep: Endpoint, body: dict, chat: bool, rec: RequestRecord, t0: float
) -> StreamResult:
    """POST one streaming request, filling ``rec``'s timestamps and usage."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    text_parts: list[str] = []
    ids: list[int] = []
    ids_complete = True
    try:
        async with client.stream("POST", path, json=body, headers=ep.headers) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {raw[:300]}"
                return StreamResult("", None)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - t0
                obj = json.loads(data)
                if obj.get("error"):
                    rec.error = f"stream error: {str(obj['error'])[:300]}"
                    break
                usage = obj.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
                    rec.completion_tokens = usage.get("completion_tokens", rec.completion_tokens) or 0
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        rec.cached_tokens = int(details["cached_tokens"])
                for choice in obj.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    chunk_ids = choice.get("token_ids")
                    n = len(chunk_ids) if chunk_ids else (1 if piece else 0)
                    if chunk_ids:
                        ids.extend(int(t) for t in chunk_ids)
                    elif piece:
                        ids_complete = False
                    if piece:
                        text_parts.append(piece)
                    if n:
                        if rec.first_token is None:
                            rec.first_token = now
                        rec.chunk_times.append(now)
                        rec.chunk_tokens.append(n)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    rec.end = time.perf_counter() - t0
    if rec.error is None and not rec.chunk_times:
        rec.error = "the stream ended without any output"
    if not rec.completion_tokens:
        rec.completion_tokens = sum(rec.chunk_tokens)
    full = ids_complete and ids and len(ids) == rec.completion_tokens
    return StreamResult("".join(text_parts), ids if full else None)


class ConversationReplay:
    """The prompts of one use of a conversation (ids or text history, or chat messages)."""

    SEPARATOR = "\n"  # between text segments, so they do not merge into one token at the seam

    def __init__(
        self, conv: Conversation, salt: str, synth: TokenSynth, ep: Endpoint, tokenizer: Tokenizer | None, start_turn: int
    ) -> None:
        self.conv, self.salt, self.synth, self.ep, self.tokenizer = conv, salt, synth, ep, tokenizer
        self.chat = conv.messages is not None
        self.history_ids: list[int] = []
        self.history_text = ""
        self.feedback: dict[str, int] = {"server_ids": 0, "retokenized": 0, "placeholder": 0}
        if ep.prompt_format == "text" and not self.chat and tokenizer is None:
            raise ValueError("text prompts from a lengths trace need --tokenizer (to make text of the right length)")
        for t in range(start_turn if not self.chat else 0):  # the context of a staggered start
            out_n = conv.turns[t].output_tokens
            self._append(self.synth.new_tokens(conv, t, salt), self.synth.placeholder_output(conv, t, salt, out_n))

    def _append(self, new_ids: list[int], out_ids: list[int]) -> None:
        if self.ep.prompt_format == "ids":
            self.history_ids += new_ids + out_ids
        else:
            self.history_text = self.SEPARATOR.join(
                s for s in (self.history_text, self.tokenizer.decode(new_ids), self.tokenizer.decode(out_ids)) if s
            )

    def body(self, turn: int) -> tuple[dict[str, Any], list[int] | None]:
        """(request body, the fresh ids of this turn or None for chat)."""
        t = self.conv.turns[turn]
        body: dict[str, Any] = {
            "model": self.ep.model,
            "max_tokens": t.output_tokens,
            "temperature": self.ep.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ep.ignore_eos:
            body["ignore_eos"] = True
        if self.ep.request_token_ids:
            body["return_token_ids"] = True
        if self.chat:
            msgs = [dict(m) for m in self.conv.messages[: self.conv.message_ends[turn]]]
            msgs[0]["content"] = f"[{self.salt}] " + msgs[0]["content"]  # no cache hits across runs
            body["messages"] = msgs
            return body, None
        new_ids = self.synth.new_tokens(self.conv, turn, self.salt)
        if self.ep.prompt_format == "ids":
            body["prompt"] = self.history_ids + new_ids
        else:
            body["prompt"] = self.SEPARATOR.join(s for s in (self.history_text, self.tokenizer.decode(new_ids)) if s)
        return body, new_ids

    def record_output(self, turn: int, new_ids: list[int] | None, result: StreamResult, n_out: int) -> None:
        if self.chat or new_ids is None:
            return
        if result.token_ids is not None:
            out, how = result.token_ids, "server_ids"
        elif self.tokenizer is not None and result.text:
            out, how = self.tokenizer.encode(result.text), "retokenized"
        else:
            out, how = self.synth.placeholder_output(self.conv, turn, self.salt, n_out), "placeholder"
        self.feedback[how] += 1
        if self.ep.prompt_format == "text" and how != "placeholder":
            self.history_text = self.SEPARATOR.join(
                s for s in (self.history_text, self.tokenizer.decode(new_ids), result.text) if s
            )
        else:
            self._append(new_ids, out)


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    feedback: dict[str, int]  # how outputs were fed back: server_ids / retokenized / placeholder


async def run_concurrency(
    conversation_at: Callable[[int], Conversation],
    num_conversations: int,
    concurrency: int,
    ep: Endpoint,
    synth: TokenSynth,
    tokenizer: Tokenizer | None = None,
    run_tag: str = "r0",
    stagger: bool = True,
    max_seconds: float | None = None,
    progress: bool = True,
) -> RunResult:
    """Replay ``num_conversations`` conversations (``conversation_at(i)``) with ``concurrency`` slots."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if num_conversations < concurrency:
        raise ValueError(f"need at least one conversation per slot ({num_conversations} < {concurrency})")
    ep.validate()
    records: list[RequestRecord] = []
    feedback = {"server_ids": 0, "retokenized": 0, "placeholder": 0}
    queue = list(range(num_conversations))
    convs = [conversation_at(i) for i in queue]
    starts = [0] * num_conversations
    if stagger:
        for s in range(concurrency):
            starts[s] = (s * len(convs[s].turns)) // concurrency
    total = sum(len(c.turns) - st for c, st in zip(convs, starts, strict=True))
    bar = Progress(total, f"concurrency {concurrency}", progress)
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(ep.timeout_s, connect=30.0)
    next_index = 0

    async def slot(s: int, client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < num_conversations:
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                return
            i = next_index
            next_index += 1
            conv = convs[i]
            replay = ConversationReplay(conv, f"{run_tag}u{i}", synth, ep, tokenizer, starts[i])
            for turn in range(starts[i], len(conv.turns)):
                if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                    break
                body, new_ids = replay.body(turn)
                rec = RequestRecord(conv.id, turn, s, time.perf_counter() - t0, cold=turn == starts[i])
                records.append(rec)
                result = await stream_request(client, ep, body, replay.chat, rec, t0)
                bar.update(1)
                if not rec.ok:
                    break  # the conversation cannot go on without this turn's output
                replay.record_output(turn, new_ids, result, rec.completion_tokens)
            for k, v in replay.feedback.items():
                feedback[k] += v

    try:
        async with httpx.AsyncClient(base_url=ep.base_url.rstrip("/"), limits=limits, timeout=timeout) as client:
            await asyncio.gather(*(slot(s, client) for s in range(concurrency)))
    finally:
        bar.close()
    return RunResult(records, time.perf_counter() - t0, feedback)
