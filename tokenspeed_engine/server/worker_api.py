"""The worker contract of the ``smg`` gateway's HTTP mode, next to the OpenAI routes.

smg (1.13) probes and polls an HTTP worker on these paths (its model_gateway sources:
workflow/steps/local/{detect_backend,discover_metadata}.rs, worker/{worker,monitor}.rs):
``/health`` (liveness, in openai_api), ``/v1/models`` (identity, in openai_api),
``/server_info`` and ``/model_info`` (labels; a ``/get_*`` fallback on 404),
``/v1/loads`` (load-aware routing; otherwise it scrapes engine-specific /metrics),
``/flush_cache``, ``/start_profile``, ``/stop_profile`` (admin fan-out), and it proxies
``/generate`` and ``/health_generate`` (SGLang's native API) besides the OpenAI routes.
The gRPC service (grpc_service.py) shares the sampling mapping and the load snapshot.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenspeed_engine.engine import RequestOutput
from tokenspeed_engine.sampling import SamplingParams
from tokenspeed_engine.server.async_engine import AsyncEngine, QueueFullError
from tokenspeed_engine.server.openai_api import APIError, OpenAIServer

VERSION = "0.1.0"
GENERATE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's /generate default
HEALTH_GENERATE_TIMEOUT_S = 20.0


class UnsupportedFeature(ValueError):
    """A request field this engine does not implement (gRPC UNIMPLEMENTED, HTTP 400)."""


@dataclass
class WorkerInfo:
    """What the gateway learns about a worker at registration (model info + server info).

    In gRPC mode the gateway loads its tokenizer from ``tokenizer_path``, else ``model_path``
    (when that is a local directory with tokenizer files), else through GetTokenizer, which
    exports ``tokenizer`` (a Hugging Face tokenizer object) when no directory has the files.
    """

    model_name: str
    model_path: str
    tokenizer_path: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    page_size: int
    max_running_requests: int
    bos_token_id: int = 0
    pad_token_id: int = 0
    model_type: str = ""
    architectures: list[str] = field(default_factory=list)
    dtype: str = ""
    tokenizer: Any = field(default=None, repr=False, compare=False)


def has_tokenizer_files(path: str) -> bool:
    return bool(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def describe(server: OpenAIServer) -> WorkerInfo:
    """The server's WorkerInfo: a launcher may attach a complete one as ``server.worker_info``;
    otherwise it is read off the engine and its tokenizer."""
    given = getattr(server, "worker_info", None)
    if isinstance(given, WorkerInfo):
        return given
    engine = server.engine.engine
    hf = getattr(engine.tokenizer, "hf", None)  # tokenspeed_engine.tokenizer.LoadedTokenizer wraps a HF tokenizer
    source = str(getattr(hf, "name_or_path", "") or "")
    return WorkerInfo(
        model_name=server.model_name,
        # never a bare name the gateway would look up on a model hub: a path that exists, or the served name
        model_path=getattr(server, "model_path", None) or (source if os.path.exists(source) else server.model_name),
        tokenizer_path=source if has_tokenizer_files(source) else "",
        vocab_size=int(engine.runner.vocab_size),
        max_model_len=int(engine.runner.max_model_len),
        eos_token_ids=sorted(int(t) for t in engine.eos_token_ids),
        page_size=int(engine.runner.page_size),
        max_running_requests=int(engine.config.max_running_requests),
        bos_token_id=int(getattr(hf, "bos_token_id", None) or 0),
        pad_token_id=int(getattr(hf, "pad_token_id", None) or 0),
        tokenizer=hf,
    )


# ---- shared with the gRPC service ---------------------------------------------------------
# Fields the engine has no implementation for, with the value that means "off".
_NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0}
_CONSTRAINTS = ("regex", "json_schema", "ebnf", "structural_tag")


def _number(sp: dict, key: str, default: float) -> float:
    value = sp.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def _integer(sp: dict, key: str, default: int | None) -> int | None:
    value = sp.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def native_sampling_params(sp: dict, prompt_len: int, max_model_len: int, default_max_new: int | None) -> SamplingParams:
    """SGLang-style sampling fields (``max_new_tokens``, ``stop``, ``sampling_seed`` ...) -> SamplingParams.

    ``default_max_new`` None means "up to the context limit" (what an OpenAI chat request
    without max_tokens asks for). Range checks stay in SamplingParams.validate (the engine's).
    """
    if not isinstance(sp, dict):
        raise ValueError("sampling_params must be an object")
    for key, neutral in _NEUTRAL.items():
        if _number(sp, key, neutral) != neutral:
            raise UnsupportedFeature(f"{key}={sp[key]!r} is not supported by this engine (only {neutral})")
    if _integer(sp, "n", 1) not in (0, 1):
        raise UnsupportedFeature(f"n={sp['n']!r}: only one sample per request is supported")
    for key in _CONSTRAINTS:
        if sp.get(key):
            raise UnsupportedFeature(f"constrained decoding ({key}) is not supported by this engine")
    if sp.get("logit_bias"):
        raise UnsupportedFeature("logit_bias is not supported by this engine")
    max_new = _integer(sp, "max_new_tokens", default_max_new)
    if max_new is None:
        max_new = max(1, max_model_len - prompt_len)
    stop = sp.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    stop_ids = sp.get("stop_token_ids") or []
    if not isinstance(stop, list) or not isinstance(stop_ids, list):
        raise ValueError("stop and stop_token_ids must be lists")
    seed = sp.get("sampling_seed", sp.get("seed"))
    return SamplingParams(
        max_tokens=max_new,
        temperature=_number(sp, "temperature", 1.0),
        top_p=_number(sp, "top_p", 1.0),
        top_k=_integer(sp, "top_k", 0),
        min_p=_number(sp, "min_p", 0.0),
        seed=seed,
        stop=list(stop),
        stop_token_ids=list(stop_ids),
        ignore_eos=bool(sp.get("ignore_eos", False)),
    )


def split_stop_token(
    ids: list[int], out: RequestOutput, params: SamplingParams, eos_ids: set[int], keep: bool
) -> tuple[list[int], int | None]:
    """Drop the EOS / stop token that ended a request from its ids (unless ``keep``); return it too.

    The engine reports that token (it was sampled) but it is not content: the gateway's
    detokenizer would otherwise show it when the tokenizer does not mark it special.
    """
    if not (out.finished and out.finish_reason == "stop" and ids):
        return ids, None
    last = ids[-1]
    if (last in eos_ids and not params.ignore_eos) or last in params.stop_token_ids:
        return (ids if keep else ids[:-1]), last
    return ids, None


def engine_load(engine: AsyncEngine) -> dict[str, Any]:
    """One rank's load in smg's SchedulerLoadSnapshot shape (also the gRPC SchedulerLoad)."""
    stats = engine.engine.last_stats
    page = int(engine.engine.runner.page_size)
    total = int(stats.pages_total) * page
    used = int(stats.pages_used) * page
    lookups = int(stats.prefix_lookup_tokens)
    return {
        "dp_rank": 0,
        "num_running_reqs": int(stats.num_running),
        "num_waiting_reqs": int(stats.num_waiting),
        "num_total_reqs": int(stats.num_running) + int(stats.num_waiting),
        "num_used_tokens": used,
        "max_total_num_tokens": total,
        "token_usage": used / total if total else 0.0,
        "cache_hit_rate": int(stats.prefix_hit_tokens) / lookups if lookups else 0.0,
        "max_running_requests": int(engine.engine.config.max_running_requests),
    }


def server_info(server: OpenAIServer, info: WorkerInfo) -> dict[str, Any]:
    """SGLang's /server_info subset that smg reads into worker labels."""
    load = engine_load(server.engine)
    return {
        "model_path": info.model_path,
        "served_model_name": info.model_name,
        "tp_size": 1,
        "dp_size": 1,
        "pp_size": 1,
        "disaggregation_mode": "null",
        "version": VERSION,
        "is_embedding": False,
        "context_length": info.max_model_len,
        "max_total_tokens": load["max_total_num_tokens"],
        "max_running_requests": info.max_running_requests,
        "page_size": info.page_size,
        "active_requests": server.engine.num_in_flight(),
    }


# ---- SGLang's native /generate --------------------------------------------------------------
async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    try:
        return await stream.__anext__()
    except (ValueError, UnsupportedFeature) as exc:
        raise APIError(400, str(exc)) from exc
    except QueueFullError as exc:
        raise APIError(429, str(exc), kind="rate_limit_exceeded") from exc
    except StopAsyncIteration:
        return None


def _meta(rid: str, out: RequestOutput, matched: int | None) -> dict[str, Any]:
    reason = None
    if out.finished:
        reason = {"type": out.finish_reason}
        if matched is not None:
            reason["matched"] = matched
    return {"id": rid, "finish_reason": reason, "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens}


async def generate(server: OpenAIServer, body: dict) -> Response:
    """POST /generate with ``text`` or ``input_ids``; cumulative text per SSE event, like SGLang."""
    if body.get("return_logprob"):
        raise APIError(400, "return_logprob is not supported by this engine", "return_logprob")
    ids = body.get("input_ids")
    if ids is None:
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise APIError(400, "give a non-empty 'text' or 'input_ids'", "text")
        ids = server.encode(text)
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise APIError(400, "'input_ids' must be a non-empty list of token ids", "input_ids")
    info = describe(server)
    try:
        params = native_sampling_params(body.get("sampling_params") or {}, len(ids), info.max_model_len,
                                        GENERATE_DEFAULT_MAX_NEW_TOKENS)
    except ValueError as exc:
        raise APIError(400, str(exc), "sampling_params") from exc
    rid = str(body.get("rid") or uuid.uuid4().hex)
    eos = set(info.eos_token_ids)
    stream = server.engine.generate(ids, params)
    first = await _first(stream)

    async def outputs() -> AsyncIterator[tuple[RequestOutput, list[int], str, int | None]]:
        text, out_ids, out = "", [], first
        try:
            while out is not None:
                new, matched = split_stop_token(out.token_ids, out, params, eos, keep=False)
                text, out_ids = text + out.text, out_ids + new
                yield out, out_ids, text, matched
                if out.finished:
                    return
                out = await stream.__anext__()
        finally:
            await stream.aclose()  # aborts the request if the client left

    if body.get("stream"):
        async def sse() -> AsyncIterator[bytes]:
            async with aclosing(outputs()) as steps:  # closing it closes (aborts) the engine stream
                async for out, out_ids, text, matched in steps:
                    payload = {"text": text, "output_ids": out_ids, "meta_info": _meta(rid, out, matched)}
                    yield f"data: {json.dumps(payload)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
    last = None
    async with aclosing(outputs()) as steps:
        async for step in steps:
            last = step
    if last is None or last[0].finish_reason == "error":
        raise APIError(500, "generation failed", kind="server_error")
    out, out_ids, text, matched = last
    return JSONResponse({"text": text, "output_ids": out_ids, "meta_info": _meta(rid, out, matched)})


async def health_generate(server: OpenAIServer) -> Response:
    """A real one-token generation: proves the serving loop steps, not just that HTTP answers."""
    if not server.engine.accepting:
        return JSONResponse({"status": "draining"}, status_code=503)
    stream = server.engine.generate([0], SamplingParams(max_tokens=1, temperature=0.0))
    try:
        out = await asyncio.wait_for(stream.__anext__(), HEALTH_GENERATE_TIMEOUT_S)
    except (ValueError, QueueFullError) as exc:
        return JSONResponse({"status": "error", "message": str(exc)}, status_code=503)
    except (TimeoutError, asyncio.TimeoutError, StopAsyncIteration):
        return JSONResponse({"status": "error", "message": "no token within the timeout"}, status_code=503)
    finally:
        await stream.aclose()
    ok = out.finish_reason != "error"
    return JSONResponse({"status": "ok" if ok else "error"}, status_code=200 if ok else 503)


def _not_available(what: str, why: str) -> JSONResponse:
    # 501 (not 404): the route exists in the contract, this engine cannot do it; smg reports the message.
    body = {"error": {"message": f"{what} is not available: {why}", "type": "not_implemented", "code": 501}}
    return JSONResponse(body, status_code=501)


def add_worker_routes(app: FastAPI, server: OpenAIServer) -> None:
    """Mount the smg worker endpoints on ``app`` (the OpenAI routes already cover /health and /v1/models)."""

    def model_info() -> dict:
        info = describe(server)
        return {"model_path": info.model_path, "tokenizer_path": info.tokenizer_path, "is_generation": True,
                "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": info.model_type, "architectures": info.architectures,
                "served_model_name": info.model_name, "max_context_length": info.max_model_len,
                "vocab_size": info.vocab_size, "eos_token_ids": info.eos_token_ids}

    for path in ("/model_info", "/get_model_info"):
        app.add_api_route(path, model_info, methods=["GET"])
    for path in ("/server_info", "/get_server_info"):
        app.add_api_route(path, lambda: server_info(server, describe(server)), methods=["GET"])

    @app.get("/v1/loads")
    async def loads() -> dict:
        timestamp = datetime.now(timezone.utc).isoformat()
        return {"timestamp": timestamp, "dp_rank_count": 1, "loads": [engine_load(server.engine)]}

    @app.post("/generate")
    async def generate_route(request: Request) -> Response:
        return await generate(server, await server.read_json(request, check_model=False))

    @app.get("/health_generate")
    async def health_generate_route() -> Response:
        return await health_generate(server)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        return _not_available("flushing the prefix cache", "the scheduler has no flush operation yet")

    @app.post("/start_profile")
    async def start_profile() -> Response:
        return _not_available("profiling", "this server has no profiler hook")

    @app.post("/stop_profile")
    async def stop_profile() -> Response:
        return _not_available("profiling", "this server has no profiler hook")

