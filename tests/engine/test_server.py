"""The OpenAI-compatible server on loopback, driven by the openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.engine.toy_model import ByteTokenizer, expected_text, toy_engine
from tokenspeed_engine.server.app_runner import BackgroundServer
from tokenspeed_engine.server.async_engine import AsyncEngine
from tokenspeed_engine.server.openai_api import OpenAIServer

MODEL = "toy"


def make_server(api_key=None, max_pending=256, max_body_bytes=64 * 1024, **engine_kwargs):
    engine = AsyncEngine(toy_engine(**engine_kwargs), max_pending_requests=max_pending)
    tok = ByteTokenizer()
    return engine, OpenAIServer(engine, MODEL, tok.encode, tok.chat, api_key=api_key, max_body_bytes=max_body_bytes)


@pytest.fixture(scope="module")
def served():
    engine, server = make_server()
    with BackgroundServer(server) as bg:
        yield engine, bg
    engine.shutdown()


def client(bg, key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=bg.url + "/v1", api_key=key, max_retries=0)


def test_completion_and_chat(served) -> None:
    _, bg = served
    c = client(bg)
    prompt = "The capital of France is"
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0)
    assert r.choices[0].text == expected_text(ByteTokenizer().encode(prompt), 7)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 7
    msgs = [{"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == expected_text(ByteTokenizer().chat(msgs), 5)
    assert r.choices[0].finish_reason == "length"
    assert [m.id for m in c.models.list().data] == [MODEL]


def test_streaming_chat_ends_with_done_and_usage(served) -> None:
    _, bg = served
    msgs = [{"role": "user", "content": "stream please"}]
    stream = client(bg).chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=9, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == expected_text(ByteTokenizer().chat(msgs), 9) and finish == "length"
    assert usage.completion_tokens == 9 and usage.prompt_tokens_details.cached_tokens >= 0
    with httpx.stream("POST", bg.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"


def test_return_token_ids_streamed_and_not(served) -> None:
    """`return_token_ids`: the generated ids, whole or per chunk; a chunk for every token."""
    _, bg = served
    prompt = "ids please"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    r = httpx.post(bg.url + "/v1/completions", json=body).json()
    ids = r["choices"][0]["token_ids"]
    assert bytes(ids).decode() == r["choices"][0]["text"] == expected_text(ByteTokenizer().encode(prompt), 6)
    assert len(ids) == r["usage"]["completion_tokens"] == 6
    with httpx.stream("POST", bg.url + "/v1/completions", json={**body, "stream": True}) as resp:
        chunks = [json.loads(ln[6:]) for ln in resp.iter_lines() if ln.startswith("data: {")]
    streamed = [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]]
    assert streamed == ids and len(chunks) == 6
    plain = httpx.post(bg.url + "/v1/completions", json={**body, "return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0]


def test_repeated_prompt_reports_cached_tokens(served) -> None:
    _, bg = served
    prompt = "a long shared system prompt that fills several pages of the cache " * 2
    c = client(bg)
    c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(prompt) - 8


@pytest.mark.parametrize(
    "body,pattern",
    [
        ('{"prompt": "x", "max_tokens": -3}', "max_tokens must be a positive integer"),
        ('{"prompt": "x", "max_tokens": 100000000}', "exceeds the limit"),
        ('{"prompt": "x", "temperature": -1}', "temperature must be in"),
        ('{"prompt": "x", "top_p": 7}', "top_p must be in"),
        ('{"prompt": "x", "temperature": "hot"}', "'temperature' has the wrong type"),
        ('{"prompt": ""}', "'prompt' is empty"),
        ('{"prompt": "' + "y" * 600 + '"}', "this model's context is 512"),
        ('{"prompt": "x", "n": 2}', "only n = 1"),
        ("{not json", "malformed JSON"),
        ("[1, 2]", "must be an object"),
    ],
)
def test_bad_completion_requests_get_400(served, body, pattern) -> None:
    _, bg = served
    r = httpx.post(bg.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert pattern in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body,pattern",
    [({"messages": []}, "'messages' must be a non-empty list"), ({"messages": [{"role": "user"}]}, "string 'content'")],
)
def test_bad_chat_requests_get_400(served, body, pattern) -> None:
    _, bg = served
    r = httpx.post(bg.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and pattern in r.json()["error"]["message"]


def test_unknown_model_and_oversized_body(served) -> None:
    _, bg = served
    r = httpx.post(bg.url + "/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "model_not_found"
    r = httpx.post(bg.url + "/v1/completions", json={"prompt": "x" * 100_000})
    assert r.status_code == 413
    assert httpx.get(bg.url + "/health").json() == {"status": "ok"}  # still alive


def test_metrics_exposes_gauges_and_histograms(served) -> None:
    _, bg = served
    client(bg).completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(bg.url + "/metrics").text
    for name in ("tokenspeed_num_requests_running", "tokenspeed_kv_usage_ratio", "tokenspeed_prefix_cache_hit_ratio",
                 "tokenspeed_time_to_first_token_seconds_bucket", "tokenspeed_inter_token_latency_seconds_count"):
        assert name in text


def test_api_key_required_except_health() -> None:
    engine, server = make_server(api_key="s3cret")
    with BackgroundServer(server) as bg:
        assert httpx.get(bg.url + "/health").status_code == 200
        assert httpx.get(bg.url + "/v1/models").status_code == 401
        assert httpx.get(bg.url + "/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(bg, "wrong").completions.create(model=MODEL, prompt="x", max_tokens=1)
        r = client(bg, "s3cret").completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert r.choices[0].text
    engine.shutdown()


def test_queue_bound_answers_429() -> None:
    engine, server = make_server(max_pending=2)
    with BackgroundServer(server) as bg:
        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                reqs = [c.post(bg.url + "/v1/completions", json={"prompt": "abcd" * 20, "max_tokens": 60}) for _ in range(8)]
                return await asyncio.gather(*reqs)

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    engine.shutdown()


def test_64_concurrent_streams_lose_nothing_and_return_pages(served) -> None:
    engine, bg = served

    async def one(c: httpx.AsyncClient, i: int) -> tuple[str, str]:
        prompt = f"stream {i} " * (1 + i % 5)
        body = {"prompt": prompt, "max_tokens": 10 + i % 7, "temperature": 0, "stream": True}
        text = ""
        async with c.stream("POST", bg.url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text, expected_text(ByteTokenizer().encode(prompt), 10 + i % 7)

    async def all_streams():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    for got, want in asyncio.run(all_streams()):
        assert got == want
    _wait_idle(engine)


def _wait_idle(engine: AsyncEngine) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = engine.engine.last_stats
        if engine.num_in_flight() == 0 and s.pages_used == 0 and s.num_running == 0 and s.num_waiting == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"pages not returned: {engine.engine.last_stats}")


def test_client_disconnect_mid_stream_aborts_and_frees_pages(served) -> None:
    engine, bg = served
    body = {"prompt": "x" * 50, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", bg.url + "/v1/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leave mid-stream
    _wait_idle(engine)
