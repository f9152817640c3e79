"""Tensor-parallel serving on one host (gloo on the CPU): two ranks give what one gives.

The same saved DeepSeek-V3 checkpoint is served by one process and by two (rank 0 runs the
scheduler and broadcasts each step, rank 1 runs its half of every layer). Greedy tokens must
match, the logits to fp32 rounding, and ``tokenspeed serve --tp 2`` must answer over HTTP and
stop its worker on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.engine.tiny_models import save_tiny_checkpoint
from tokenspeed_engine.llm import LLM
from tokenspeed_engine.sampling import SamplingParams
from tokenspeed_engine.scheduler import Scheduler, SchedulerConfig
from tokenspeed_engine.server.app_runner import free_port

ENGINE_KW = dict(device="cpu", dtype="float32", kv_cache_tokens=1024, max_model_len=256, page_size=4)
PROMPTS = [[5, 3, 8, 1, 9], [2, 7, 7, 4, 1, 6, 3, 3, 8] * 3, [30, 31, 32], list(range(40, 101))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_deepseek"))


@pytest.fixture(scope="module")
def single(checkpoint):
    return LLM(str(checkpoint), **ENGINE_KW)


@pytest.fixture(scope="module")
def pair(checkpoint):
    llm = LLM(str(checkpoint), tp=2, enable_overlap=True, **ENGINE_KW)
    yield llm
    procs = llm.engine.runner.procs
    llm.engine.close()
    assert [p.exitcode for p in procs] == [0]


def test_two_ranks_generate_what_one_does(single, pair) -> None:
    assert pair.engine.runner.world_size == 2 and pair.engine.overlap
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    one = [c.token_ids for c in single.generate(PROMPTS, params)]
    two = [c.token_ids for c in pair.generate(PROMPTS, params)]
    assert one == two and all(len(t) == 12 for t in one)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    assert [c.token_ids for c in single.generate(PROMPTS, seeded)] == [c.token_ids for c in pair.generate(PROMPTS, seeded)]


def step_logits(runner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a prefill step and two decode steps, planned by a fresh scheduler over the runner's pool."""
    s = Scheduler(
        SchedulerConfig(
            num_pages=runner.num_pages,
            page_size=runner.page_size,
            max_num_batched_tokens=512,
            max_context_len=runner.max_model_len,
        )
    )
    for rid, p in enumerate(prompts):
        s.submit(rid, p, 8)
    out = []
    for _ in range(3):
        plan = s.next_plan()
        logits = runner.forward(plan, s.block_table)
        out.append(logits)
        sampled = np.asarray(plan.request_ids)[np.asarray(plan.sample, dtype=bool)]
        s.advance({int(r): [int(t)] for r, t in zip(sampled, logits.argmax(-1).tolist(), strict=True)})
    return out


def test_two_ranks_logits_match_one_rank(single, pair) -> None:
    for a, b in zip(step_logits(single.engine.runner, PROMPTS), step_logits(pair.engine.runner, PROMPTS), strict=True):
        assert a.shape == b.shape == (len(PROMPTS), 211)
        assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_serve_tp2_answers_and_stops_its_worker_on_sigterm(checkpoint, single) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tokenspeed_engine.cli",
        "serve",
        "--model",
        str(checkpoint),
        "--tp",
        "2",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--kv-cache-tokens",
        "1024",
        "--max-model-len",
        "256",
        "--page-size",
        "4",
        "--enable-overlap",
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        workers = _children(server.pid)
        assert workers, "no tensor-parallel worker process"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        want = single.generate(PROMPTS[:2], params)
        for prompt, ref in zip(PROMPTS[:2], want, strict=True):
            r = client.completions.create(
                model=checkpoint.name, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
            )
            assert r.choices[0].text == ref.text and r.usage.completion_tokens == 10
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        deadline = time.monotonic() + 30
        while not all(_gone(w) for w in workers):
            assert time.monotonic() < deadline, f"worker processes {workers} outlived the server"
            time.sleep(0.2)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
