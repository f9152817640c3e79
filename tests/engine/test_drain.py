"""SIGTERM drains: requests in flight finish whole, new ones are refused, the server exits."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.engine.toy_model import ByteTokenizer, ToyRunner, expected_text
from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.server.app_runner import BackgroundServer
from tokenspeed_engine.server.async_engine import AsyncEngine
from tokenspeed_engine.server.openai_api import OpenAIServer


class SlowRunner(ToyRunner):
    """The toy model, 5 ms a step: a 300-token stream lasts long enough to be caught mid-way."""

    def forward(self, plan, block_table):
        time.sleep(0.005)
        return super().forward(plan, block_table)


def test_sigterm_finishes_in_flight_streams_and_refuses_new_ones() -> None:
    tok = ByteTokenizer()
    engine = AsyncEngine(Engine(SlowRunner(max_model_len=1024), tok, {0}, EngineConfig(64, 16)))
    server = OpenAIServer(engine, "toy", tok.encode, tok.chat)
    bg = BackgroundServer(server)
    bg.__enter__()
    prompt = "drain me " * 3
    text, got_first = [], threading.Event()

    def stream() -> None:
        body = {"prompt": prompt, "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", bg.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    got_first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert got_first.wait(30)
    bg._uv.handle_exit(signal.SIGTERM, None)  # what uvicorn runs on SIGTERM
    assert engine.accepting is False
    refused = False
    try:
        r = httpx.post(bg.url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
        refused = r.status_code in (429, 503)
    except httpx.TransportError:
        refused = True  # the listener is already closed
    assert refused
    t.join(60)
    assert "".join(text) == expected_text(tok.encode(prompt), 300)
    bg.__exit__(None, None, None)
    engine.shutdown()
