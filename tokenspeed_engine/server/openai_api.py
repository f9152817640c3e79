"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models,
plus /health and /metrics.

Bad input always gets a 400 with an OpenAI-style error body (never a 500 or a dead
server); bodies over the size limit get 413; a full queue gets 429; with an API key
configured every endpoint but /health needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tokenspeed_engine.engine import RequestOutput
from tokenspeed_engine.sampling import SamplingParams
from tokenspeed_engine.server.async_engine import AsyncEngine, QueueFullError

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise APIError(400, f"'{name}' must be {getattr(kind, '__name__', kind)}, got a boolean", name)
    if not isinstance(value, kind):
        raise APIError(400, f"'{name}' has the wrong type ({type(value).__name__})", name)
    return value


def sampling_params_from(body: dict, default_max_tokens: int) -> SamplingParams:
    """Read the OpenAI sampling fields; type errors here, range errors in SamplingParams.validate."""
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if _field(body, "n", int, 1) != 1:
        raise APIError(400, "only n = 1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else _field({"max_tokens": max_tokens}, "max_tokens", int, 0),
        temperature=float(_field(body, "temperature", (int, float), 1.0)),
        top_p=float(_field(body, "top_p", (int, float), 1.0)),
        top_k=_field(body, "top_k", int, 0),
        min_p=float(_field(body, "min_p", (int, float), 0.0)),
        seed=_field(body, "seed", int, None),
        stop=stop,
        stop_token_ids=_field(body, "stop_token_ids", list, []),
        ignore_eos=_field(body, "ignore_eos", bool, False),
    )


class OpenAIServer:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        encode: Callable[[str], list[int]],
        chat_template: Callable[[list[dict]], list[int]],
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.engine, self.model_name = engine, model_name
        self.encode, self.chat_template = encode, chat_template
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.created = int(time.time())

    # ---- request plumbing --------------------------------------------------------
    async def read_json(self, request: Request, check_model: bool = True) -> dict:
        """The body as a JSON object under the size limit; ``check_model`` rejects another model's name
        (off for SGLang's /generate, which has no model field and to which smg adds "unknown")."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"request body over {self.max_body_bytes} bytes", kind="request_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise APIError(413, f"request body over {self.max_body_bytes} bytes", kind="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"malformed JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object")
        model = body.get("model")
        if check_model and model is not None and model != self.model_name:
            # 400 for every bad request field, an unknown model included (the contract of issue 12)
            raise APIError(400, f"model '{model}' does not exist; this server serves '{self.model_name}'", "model",
                           "model_not_found")
        return body

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty list", "messages")
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise APIError(400, "each message needs a string 'role' and a string 'content'", "messages")
            return self.chat_template(messages)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "'prompt' is empty", "prompt")
            return self.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise APIError(400, "'prompt' must be a non-empty string or a list of token ids", "prompt")

    async def start(self, body: dict, chat: bool) -> tuple[AsyncIterator[RequestOutput], RequestOutput | None]:
        """Validate and submit; returns the stream and its first output (so errors surface before 200)."""
        ids = self.prompt_ids(body, chat)
        params = sampling_params_from(body, default_max_tokens=256 if chat else 16)
        stream = self.engine.generate(ids, params)
        try:
            first = await stream.__anext__()
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        except QueueFullError as exc:
            raise APIError(429, str(exc), kind="rate_limit_exceeded") from exc
        except StopAsyncIteration:
            first = None
        return stream, first

    # ---- responses -----------------------------------------------------------------
    def _usage(self, last: RequestOutput) -> dict:
        return {
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens},
        }

    def _choice(
        self, chat: bool, text: str, finish: str | None, delta: bool, token_ids: list[int] | None = None
    ) -> dict:
        if not chat:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        else:
            key = "delta" if delta else "message"
            choice = {"index": 0, key: {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        if token_ids is not None:  # `return_token_ids` (vLLM's extension): the generated ids
            choice["token_ids"] = token_ids
        return choice

    async def complete(self, body: dict, chat: bool) -> Response:
        stream, first = await self.start(body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        want_ids = _field(body, "return_token_ids", bool, False)
        if _field(body, "stream", bool, False):
            include_usage = bool((_field(body, "stream_options", dict, {}) or {}).get("include_usage", False))
            return StreamingResponse(
                self._sse(stream, first, rid, obj + (".chunk" if chat else ""), chat, include_usage, want_ids),
                media_type="text/event-stream",
            )
        text, last, ids = "", first, []
        if first is not None:
            text, ids = first.text, list(first.token_ids)
            async for out in stream:
                text += out.text
                ids += out.token_ids
                last = out
        if last is None or last.finish_reason == "error":
            raise APIError(500, "generation failed", kind="server_error")
        return JSONResponse({
            "id": rid, "object": obj, "created": int(time.time()), "model": self.model_name,
            "choices": [self._choice(chat, text, last.finish_reason, delta=False, token_ids=ids if want_ids else None)],
            "usage": self._usage(last),
        })

    async def _sse(self, stream, first, rid, obj, chat, include_usage, want_ids=False) -> AsyncIterator[bytes]:
        def chunk(payload: dict) -> bytes:
            return f"data: {json.dumps(payload)}\n\n".encode()

        base = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name}
        last = None
        out = first
        try:
            while out is not None:
                last = out
                # With return_token_ids every step with a token is sent (a token may release no
                # text yet), so clients can time each token and rebuild the exact ids.
                if out.text or out.finished or (want_ids and out.token_ids):
                    ids = list(out.token_ids) if want_ids else None
                    yield chunk({**base, "choices": [self._choice(chat, out.text, out.finish_reason, True, ids)]})
                if out.finished:
                    break
                out = await stream.__anext__()
            if include_usage and last is not None:
                yield chunk({**base, "choices": [], "usage": self._usage(last)})
            yield b"data: [DONE]\n\n"
        finally:
            await stream.aclose()  # aborts the request if the client went away mid-stream


def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="TokenSpeed", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if server.api_key and request.url.path != "/health":
            expected = f"Bearer {server.api_key}"
            if not secrets.compare_digest(request.headers.get("authorization", ""), expected):
                return APIError(401, "missing or wrong API key", kind="authentication_error").response()
        try:
            return await call_next(request)
        except APIError as err:
            return err.response()

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(err).__name__}", kind="server_error").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok" if server.engine.accepting else "draining"}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "tokenspeed"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.engine.metrics.render(server.engine.gauges()), media_type="text/plain")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.complete(await server.read_json(request), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await server.complete(await server.read_json(request), chat=True)

    from tokenspeed_engine.server.worker_api import add_worker_routes  # imports this module: import here

    add_worker_routes(app, server)  # the smg gateway's worker endpoints
    return app
