"""The smg gateway contract: the TokenSpeedScheduler gRPC service, the HTTP worker routes,
and the real ``smg`` router (PyPI smg) in front of toy replicas in HTTP and gRPC mode.

The toy model (tests/engine/toy_model.py) makes every greedy output known in advance, so
each path is checked against ``expected_text`` and against the replica answering directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile

import grpc
import httpx
import openai
import pytest
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import tokenspeed_scheduler_pb2 as pb
from smg_grpc_proto.generated import tokenspeed_scheduler_pb2_grpc as pb_grpc

from tests.engine.gateway_toy import MODEL, GrpcHarness, check_agrees, replica_command, save_byte_tokenizer
from tests.engine.test_server import _wait_idle, make_server
from tests.engine.toy_model import ByteTokenizer, expected_text
from tokenspeed_engine import cli
from tokenspeed_engine.server import gateway as gw
from tokenspeed_engine.server.app_runner import BackgroundServer, free_port, free_port_block

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    directory = save_byte_tokenizer(str(tmp_path_factory.mktemp("toy-tokenizer")))
    check_agrees(directory)  # the gRPC-mode comparisons below mean nothing if this fails
    return directory


@pytest.fixture(scope="module")
def harness(tokenizer_dir):
    h = GrpcHarness(tokenizer_dir)
    yield h
    h.close()


@pytest.fixture(scope="module")
def stub(harness) -> pb_grpc.TokenSpeedSchedulerStub:
    return pb_grpc.TokenSpeedSchedulerStub(grpc.insecure_channel(harness.address))


def gen_request(prompt: str, max_new: int | None = 7, rid: str = "", stream: bool = False, **sampling) -> pb.GenerateRequest:
    params = pb.SamplingParams(temperature=0.0, **({"max_new_tokens": max_new} if max_new is not None else {}), **sampling)
    return pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=TOK.encode(prompt)),
                              sampling_params=params, stream=stream)


def as_text(ids) -> str:
    return bytes(ids).decode()


# ---- the gRPC service, directly ------------------------------------------------------------------
def test_grpc_generate_non_streaming_and_streaming(stub) -> None:
    prompt = "The capital of France is"
    (only,) = list(stub.Generate(gen_request(prompt)))
    assert only.WhichOneof("response") == "complete"
    done = only.complete
    assert as_text(done.output_ids) == expected_text(TOK.encode(prompt), 7)
    assert (done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("length", len(prompt), 7)

    msgs = list(stub.Generate(gen_request(prompt, max_new=9, stream=True)))
    chunks, final = msgs[:-1], msgs[-1]
    assert len(chunks) >= 2 and all(m.WhichOneof("response") == "chunk" for m in chunks)
    streamed = [t for m in chunks for t in m.chunk.token_ids]
    assert as_text(streamed) == expected_text(TOK.encode(prompt), 9) == as_text(final.complete.output_ids)
    assert final.complete.cached_tokens >= len(prompt) - 8  # the first request left the prompt in the prefix cache


def test_grpc_default_max_tokens_and_stop_token_trimming(stub) -> None:
    prompt = "abc"
    want = TOK.encode(expected_text(TOK.encode(prompt), 5))
    stop_id = want[3]  # the 4th token ends the request
    done = list(stub.Generate(gen_request(prompt, stop_token_ids=[stop_id])))[-1].complete
    assert list(done.output_ids) == want[:3] and done.finish_reason == "stop" and done.matched_token_id == stop_id
    kept = list(stub.Generate(gen_request(prompt, stop_token_ids=[stop_id], no_stop_trim=True)))[-1].complete
    assert list(kept.output_ids) == want[:4]
    # no max_new_tokens (a chat request without max_tokens): runs to the context limit (512)
    done = list(stub.Generate(gen_request("x" * 500, max_new=None)))[-1].complete
    assert done.finish_reason == "length" and done.completion_tokens == 12


def test_grpc_abort_rpc_and_client_cancel_free_the_request(harness, stub) -> None:
    stream = stub.Generate(gen_request("y" * 40, max_new=400, rid="long-1", stream=True))
    first = next(stream)
    assert first.WhichOneof("response") == "chunk"
    with pytest.raises(grpc.RpcError) as dup:  # the same id twice is refused while the first runs
        list(stub.Generate(gen_request("z", rid="long-1")))
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stub.Abort(pb.AbortRequest(request_id="long-1")).success
    rest = list(stream)
    assert rest[-1].complete.finish_reason == "abort" and rest[-1].complete.completion_tokens < 400
    _wait_idle(harness.engine)
    assert not stub.Abort(pb.AbortRequest(request_id="long-1")).success  # gone

    call = stub.Generate(gen_request("w" * 40, max_new=400, rid="long-2", stream=True))
    next(call)
    call.cancel()  # what a gateway does when its client disconnects
    _wait_idle(harness.engine)


@pytest.mark.parametrize(
    "request_kwargs,code,pattern",
    [
        (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "input_ids is empty"),
        (dict(prompt="x", max_new=10**6), grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
        (dict(prompt="x", top_p=7.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in"),
        (dict(prompt="x" * 600), grpc.StatusCode.INVALID_ARGUMENT, "this model's context is 512"),
        (dict(prompt="x", n=2), grpc.StatusCode.UNIMPLEMENTED, "one sample per request"),
        (dict(prompt="x", frequency_penalty=0.5), grpc.StatusCode.UNIMPLEMENTED, "frequency_penalty"),
        (dict(prompt="x", regex="a+"), grpc.StatusCode.UNIMPLEMENTED, "constrained decoding"),
    ],
)
def test_grpc_bad_requests_get_status_codes(stub, request_kwargs, code, pattern) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gen_request(**request_kwargs)))
    assert err.value.code() == code and pattern in err.value.details()


def test_grpc_out_of_vocab_and_logprobs(stub) -> None:
    req = gen_request("x")
    req.tokenized.input_ids[:] = [1, 999]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token ids must be in [0, 256)" in err.value.details()
    req = gen_request("x")
    req.return_logprob = True
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "logprobs" in err.value.details()


def test_grpc_full_queue_is_resource_exhausted() -> None:
    h = GrpcHarness(max_pending=1)
    try:
        s = pb_grpc.TokenSpeedSchedulerStub(grpc.insecure_channel(h.address))
        running = s.Generate(gen_request("q" * 30, max_new=300, stream=True))
        next(running)
        with pytest.raises(grpc.RpcError) as err:
            list(s.Generate(gen_request("r")))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
    finally:
        h.close()


def test_grpc_health_info_loads_and_tokenizer(harness, stub, tokenizer_dir) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert stub.HealthCheck(pb.HealthCheckRequest()).healthy
    standard = health_pb2_grpc.HealthStub(grpc.insecure_channel(harness.address))
    assert standard.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.served_model_name, info.vocab_size, info.max_context_length, list(info.eos_token_ids)) == (MODEL, 256, 512, [0])
    server = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert server.max_total_num_tokens == 255 * 4 and server.server_args["served_model_name"] == MODEL
    loads = stub.GetLoads(pb.GetLoadsRequest(include=["all"]))
    rank = loads.loads[0]
    assert loads.dp_rank_count == 1 and rank.max_total_num_tokens == 1020 and rank.memory.token_capacity == 1020
    assert not stub.GetLoads(pb.GetLoadsRequest(dp_rank=3)).loads

    chunks = list(stub.GetTokenizer(common_pb2.GetTokenizerRequest()))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest() and all(not c.sha256 for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        exported = json.loads(zf.read("tokenizer.json"))
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        assert exported["model"]["vocab"] == json.load(f)["model"]["vocab"]

    for rpc, req in [(stub.FlushCache, common_pb2.FlushCacheRequest()), (stub.StartProfile, common_pb2.StartProfileRequest())]:
        with pytest.raises(grpc.RpcError) as err:
            rpc(req)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as err:
        list(stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest()))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---- the HTTP worker routes ----------------------------------------------------------------------
def test_worker_routes() -> None:
    engine, server = make_server()
    with BackgroundServer(server) as bg:
        for path in ("/server_info", "/get_server_info"):
            body = httpx.get(bg.url + path).json()
            assert body["served_model_name"] == MODEL and body["context_length"] == 512 and body["max_total_tokens"] == 1020
        assert httpx.get(bg.url + "/model_info").json()["is_generation"] is True
        loads = httpx.get(bg.url + "/v1/loads?include=core").json()
        assert loads["dp_rank_count"] == 1 and loads["loads"][0]["max_total_num_tokens"] == 1020
        assert httpx.get(bg.url + "/health_generate").status_code == 200
        assert httpx.post(bg.url + "/flush_cache").status_code == 501

        body = {"text": "hello", "model": "unknown", "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
        out = httpx.post(bg.url + "/generate", json=body).json()  # smg adds model "unknown": ignored here
        assert out["text"] == expected_text(TOK.encode("hello"), 6) and bytes(out["output_ids"]).decode() == out["text"]
        assert out["meta_info"]["finish_reason"] == {"type": "length"} and out["meta_info"]["completion_tokens"] == 6
        with httpx.stream("POST", bg.url + "/generate", json={**body, "stream": True}) as r:
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["text"] == out["text"]  # cumulative, like SGLang
        for bad, pattern in [({"sampling_params": {"frequency_penalty": 1.0}, "text": "x"}, "frequency_penalty"),
                             ({"sampling_params": {}}, "'text' or 'input_ids'"), ({"input_ids": [1, 999]}, "[0, 256)")]:
            r = httpx.post(bg.url + "/generate", json=bad)
            assert r.status_code == 400 and pattern in r.json()["error"]["message"], r.text
    engine.shutdown()


# ---- the real smg router in front -------------------------------------------------------------------
def _wait_ready(url: str, workers: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readiness", timeout=2)
            if r.status_code == 200 and r.json().get("healthy_workers") == workers:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"smg at {url} not ready")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _check_same_as_direct(gateway_url: str, direct_url: str) -> None:
    """Greedy completions, chat and streamed chat through the gateway == the replica directly == the toy."""
    via, direct = _client(gateway_url), _client(direct_url)
    for prompt in ("The capital of France is", "a long shared system prompt " * 3):
        a = via.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        b = direct.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert a.choices[0].text == b.choices[0].text == expected_text(TOK.encode(prompt), 8)
        assert a.usage.completion_tokens == 8 and a.choices[0].finish_reason == "length"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    a = via.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    b = direct.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content == expected_text(TOK.chat(msgs), 6)
    stream = via.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected_text(TOK.chat(msgs), 6)
    full = expected_text(TOK.encode("stop here"), 8)
    stop = full[4:6]  # a two-character stop string inside the output
    a = via.completions.create(model=MODEL, prompt="stop here", max_tokens=8, temperature=0, stop=[stop])
    assert a.choices[0].text == full[: full.find(stop)] and a.choices[0].finish_reason == "stop"
    # cache-aware routing: the repeat of a long prompt goes where its prefix is cached
    prompt = "an agent's long conversation history, turn after turn, " * 3
    via.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = via.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= len(prompt) - 8


def test_smg_http_mode_in_front_of_two_replicas() -> None:
    servers = [make_server() for _ in range(2)]
    with BackgroundServer(servers[0][1]) as one, BackgroundServer(servers[1][1]) as two:
        cfg = gw.GatewayConfig(port=free_port(), mode="http", worker_base_port=free_port_block(8), drain_seconds=2)
        router = subprocess.Popen(gw.router_command(cfg, [one.url, two.url], free_port()),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{cfg.port}"
        try:
            _wait_ready(url, 2)
            workers = httpx.get(url + "/workers").json()["workers"]
            assert sorted(w["url"] for w in workers) == sorted([one.url, two.url])
            assert {w["runtime_type"] for w in workers} == {"sglang"}  # found through /server_info
            _check_same_as_direct(url, one.url)
            body = {"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
            out = httpx.post(url + "/generate", json=body)
            assert out.json()["text"] == expected_text(TOK.encode("hello"), 4)
        finally:
            router.terminate()
            router.wait(30)
    for engine, _ in servers:
        engine.shutdown()


def test_smg_grpc_mode_via_gateway_module(tokenizer_dir) -> None:
    """gateway.Gateway over two toy replica processes; the gateway fetches the tokenizer over GetTokenizer."""
    cfg = gw.GatewayConfig(
        port=free_port(), mode="grpc", worker_base_port=free_port_block(8), drain_seconds=2, startup_timeout_s=90
    )
    with gw.Gateway(cfg, 2, replica_command(tokenizer_dir, export=True)) as g:
        workers = httpx.get(g.url + "/workers").json()["workers"]
        assert {w["runtime_type"] for w in workers} == {"tokenspeed"} and len(workers) == 2
        direct = f"http://127.0.0.1:{g.ports[0][0]}"
        _check_same_as_direct(g.url, direct)
        with pytest.raises(openai.BadRequestError):  # INVALID_ARGUMENT -> 400
            _client(g.url).completions.create(model=MODEL, prompt="x", max_tokens=10**6, temperature=0)
        with pytest.raises(openai.APIStatusError) as err:  # UNIMPLEMENTED -> 501, with our message
            _client(g.url).completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=2)
        assert err.value.status_code == 501 and "logprobs" in str(err.value)
        pids = [p.pid for p in [*g.replicas, g.router]]
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
            kids = set()
            for task in tasks:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids |= {int(k) for k in f.read().split()}
        except FileNotFoundError:  # exited meanwhile
            continue
        todo += list(kids - found)
        found |= kids
    return found


def test_gateway_process_stops_its_children_on_sigterm(tokenizer_dir) -> None:
    port = free_port()
    """HTTP mode with an API key (the gateway checks it and passes it on to the replicas, which
    check it too), then SIGTERM: exit code 0 and no child left."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.engine.gateway_toy", "gateway", "--port", str(port), "--dp", "2",
                             "--mode", "http", "--worker-base-port", str(free_port_block(8)), "--tokenizer-dir", tokenizer_dir,
                             "--api-key", "s3cret"],
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, 2, timeout=90)
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        r = keyed.completions.create(model=MODEL, prompt="sig", max_tokens=3, temperature=0)
        assert r.choices[0].text == expected_text(TOK.encode("sig"), 3)
        with pytest.raises(openai.AuthenticationError):
            _client(url).completions.create(model=MODEL, prompt="sig", max_tokens=3)
        children = _descendants(proc.pid)
        assert len(children) >= 3  # two replicas and smg
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{c}") for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if os.path.exists(f"/proc/{c}")]
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- the CLI and the launcher's pieces ----------------------------------------------------------
def test_cli_replica_argv_and_gateway_errors(monkeypatch, caplog) -> None:
    args = cli.build_parser().parse_args(["serve", "--gateway", "--dp", "3", "--port", "9000", "--model", "/m.gguf",
                                          "--max-model-len", "256", "--api-key", "k", "--device", "cpu"])
    argv = cli.replica_argv(args)
    assert argv[argv.index("--model") + 1] == "/m.gguf" and argv[argv.index("--max-model-len") + 1] == "256"
    assert not {"--gateway", "--dp", "--port", "--api-key", "--host"} & set(argv)
    cfg = gw.GatewayConfig(port=9000)
    assert gw.replica_ports(cfg, 3) == [(9001, 9004), (9002, 9005), (9003, 9006)]
    cmd = gw.router_command(cfg, ["grpc://127.0.0.1:9004"], 5555)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--prometheus-host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--policy") + 1] == "cache_aware"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert gw.replica_env(1, 2, "cuda") == {"CUDA_VISIBLE_DEVICES": "6,7"} and gw.replica_env(0, 1, "cpu") == {}
    with pytest.raises(gw.GatewayError, match="needs GPUs 4..5"):
        gw.replica_env(2, 2, "cuda")
    real_find_spec = gw.importlib.util.find_spec
    monkeypatch.setattr(gw.importlib.util, "find_spec", lambda name: None if name == "smg" else real_find_spec(name))
    assert cli.main(["serve", "--dp", "2", "--port", str(free_port())]) == 1
    assert "`pip install smg`" in caplog.text



def test_gateway_reports_a_dead_replica_and_a_busy_port(caplog) -> None:
    cfg = gw.GatewayConfig(port=free_port(), mode="http", worker_base_port=free_port_block(8), startup_timeout_s=30)
    dead = gw.Gateway(cfg, 1, lambda i, http, grpc_port: [sys.executable, "-c", "raise SystemExit(3)"])
    assert dead.run() == 1 and "replica 0" in caplog.text and "exited with code 3" in caplog.text
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cfg = gw.GatewayConfig(port=free_port(), mode="grpc", worker_base_port=taken)
        with pytest.raises(gw.GatewayError, match=f"port {taken} on 127.0.0.1 is not free"):
            gw.Gateway(cfg, 2, replica_command("/unused")).start()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tokenspeed_engine.launch") is None,
                    reason="tokenspeed_engine.launch.build_server, which `tokenspeed serve` calls to load a model, "
                           "is not in this build yet")
def test_cli_serve_gateway_dp2_with_the_default_model() -> None:
    """`tokenspeed serve --gateway --dp 2` on CPU with the embedded SmolLM2: greedy answers through
    the gateway (which tokenises with the tokenizer the replicas export) equal a replica's own."""
    port, base = free_port(), free_port_block(8)
    proc = subprocess.Popen([sys.executable, "-m", "tokenspeed_engine.cli", "serve", "--gateway", "--dp", "2",
                             "--device", "cpu", "--port", str(port), "--worker-base-port", str(base), "--max-model-len", "512"],
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, 2, timeout=900)
        model = _client(url).models.list().data[0].id
        via, direct = _client(url), _client(f"http://127.0.0.1:{base}")
        a, b = (c.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
                for c in (via, direct))
        assert a.choices[0].text == b.choices[0].text and a.choices[0].text
        msgs = [{"role": "user", "content": "Name a primary colour."}]
        a, b = (c.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0) for c in (via, direct))
        assert a.choices[0].message.content == b.choices[0].message.content and a.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
