"""The ``TokenSpeedScheduler`` gRPC service (smg-grpc-proto) over AsyncEngine, for the smg gateway.

In gRPC mode the gateway tokenises, applies chat templates, detokenises and parses tools;
this service moves token ids only. What the gateway calls (smg 1.13 model_gateway):
HealthCheck to detect the runtime and to probe, GetModelInfo + GetServerInfo at
registration, GetLoads for load-aware policies, Generate (server-streaming) per request,
Abort when its client goes away, GetTokenizer when it cannot read the tokenizer itself,
SubscribeKvEvents for cache-aware routing, FlushCache / Start/StopProfile on admin calls.
The standard grpc.health.v1 service is served too (smg's own launcher probes it).

Status codes: INVALID_ARGUMENT for bad input (gateway -> HTTP 400), UNIMPLEMENTED for a
feature this engine lacks (-> 501), RESOURCE_EXHAUSTED when the queue is full (-> 429),
ALREADY_EXISTS for a duplicate request id, INTERNAL when the engine fails a step.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import signal
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

try:
    import grpc
    from google.protobuf.struct_pb2 import Struct
    from google.protobuf.timestamp_pb2 import Timestamp
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from smg_grpc_proto.generated import common_pb2
    from smg_grpc_proto.generated import tokenspeed_scheduler_pb2 as pb
    from smg_grpc_proto.generated import tokenspeed_scheduler_pb2_grpc as pb_grpc
except ImportError as exc:  # say which packages, not just which module
    raise ImportError(
        f"the gRPC service needs grpcio, grpcio-health-checking and smg-grpc-proto ({exc}); "
        "`pip install grpcio grpcio-health-checking smg-grpc-proto` (make setup installs them)"
    ) from exc

from tokenspeed_engine.engine import RequestOutput
from tokenspeed_engine.sampling import SamplingParams
from tokenspeed_engine.server.async_engine import AsyncEngine, QueueFullError
from tokenspeed_engine.server.openai_api import OpenAIServer
from tokenspeed_engine.server.worker_api import (
    VERSION,
    UnsupportedFeature,
    WorkerInfo,
    describe,
    engine_load,
    has_tokenizer_files,
    native_sampling_params,
    split_stop_token,
)

log = logging.getLogger("tokenspeed.grpc")

TOKENIZER_CHUNK_BYTES = 64 * 1024  # the gateway's client reassembles chunks of this size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.json")
TOKENIZER_GLOBS = ("*.jinja", "*.tiktoken")
HEALTH_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_ABORTED = object()  # queue sentinel: the Abort RPC cancelled this request


def _sampling_dict(p: pb.SamplingParams) -> dict:
    """Proto -> the SGLang-style dict worker_api validates; unset optionals stay absent (engine defaults)."""
    d: dict = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "max_new_tokens", "sampling_seed"):
        if p.HasField(name):
            d[name] = getattr(p, name)
    d.update(min_new_tokens=p.min_new_tokens, n=p.n, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
             ignore_eos=p.ignore_eos)
    if p.logit_bias:
        d["logit_bias"] = dict(p.logit_bias)
    constraint = p.WhichOneof("constraint")
    if constraint:
        d["ebnf" if constraint == "ebnf_grammar" else constraint] = getattr(p, constraint)
    return d


def request_params(req: pb.GenerateRequest, max_model_len: int) -> tuple[list[int], SamplingParams]:
    """Validate a GenerateRequest; ValueError (-> INVALID_ARGUMENT) or UnsupportedFeature (-> UNIMPLEMENTED)."""
    if req.HasField("mm_inputs") and len(req.mm_inputs.items):
        raise UnsupportedFeature("multimodal inputs are not supported by this engine")
    if req.HasField("kv_bootstrap_info") or req.HasField("encode_bootstrap_info"):
        raise UnsupportedFeature("disaggregated prefill/decode/encode is not supported by this engine")
    if req.return_logprob or req.top_logprobs_num > 0 or len(req.token_ids_logprob):
        raise UnsupportedFeature("logprobs are not supported by this engine")
    if req.HasField("data_parallel_rank") and req.data_parallel_rank > 0:
        raise ValueError(f"data_parallel_rank {req.data_parallel_rank}: this worker has one rank (0)")
    ids = list(req.tokenized.input_ids)
    if not ids:
        raise ValueError("tokenized.input_ids is empty")
    return ids, native_sampling_params(_sampling_dict(req.sampling_params), len(ids), max_model_len, None)


def _status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, UnsupportedFeature):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


async def _pump(stream: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> None:
    """Move engine outputs into ``queue``. Cancelling the task (Abort) aborts the engine request:
    AsyncEngine.generate's finally does that when the cancellation lands in its ``await``."""
    try:
        async for out in stream:
            queue.put_nowait(out)
    except Exception as exc:  # ValueError / QueueFullError at the first step, or an engine bug
        queue.put_nowait(exc)


def _start_pump(stream: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> asyncio.Task:
    task = asyncio.create_task(_pump(stream, queue))
    # A done-callback (not an except clause) also covers a cancel that lands before the task first runs.
    task.add_done_callback(lambda t: queue.put_nowait(_ABORTED) if t.cancelled() else None)
    return task


class TokenSpeedSchedulerService(pb_grpc.TokenSpeedSchedulerServicer):
    def __init__(self, engine: AsyncEngine, info: WorkerInfo) -> None:
        self.engine, self.info = engine, info
        self._exported: tempfile.TemporaryDirectory | None = None
        self._pumps: dict[str, asyncio.Task] = {}
        self.started = time.time()

    @classmethod
    def from_server(cls, server: OpenAIServer) -> TokenSpeedSchedulerService:
        return cls(server.engine, describe(server))

    # ---- generation ------------------------------------------------------------------------
    def _response(self, rid: str, out: RequestOutput, ids: list[int], complete: bool,
                  reason: str | None = None, matched: int | None = None) -> pb.GenerateResponse:
        counts = dict(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                      cached_tokens=out.cached_tokens)
        if not complete:
            return pb.GenerateResponse(request_id=rid, chunk=pb.GenerateStreamChunk(token_ids=ids, **counts))
        done = pb.GenerateComplete(output_ids=ids, finish_reason=reason or out.finish_reason or "stop", **counts)
        if matched is not None:
            done.matched_token_id = matched
        return pb.GenerateResponse(request_id=rid, complete=done)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        try:
            ids, params = request_params(request, self.info.max_model_len)
        except ValueError as exc:
            await context.abort(_status_for(exc), str(exc))
        if rid in self._pumps:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is already running")
        queue: asyncio.Queue = asyncio.Queue()
        pump = _start_pump(self.engine.generate(ids, params), queue)
        self._pumps[rid] = pump
        eos, keep = set(self.info.eos_token_ids), request.sampling_params.no_stop_trim
        generated: list[int] = []
        last = RequestOutput(0, [], "", prompt_tokens=len(ids))
        try:
            while True:
                item = await queue.get()
                if item is _ABORTED:
                    last.completion_tokens = len(generated)
                    yield self._response(rid, last, generated, complete=True, reason="abort")
                    return
                if isinstance(item, BaseException):
                    await context.abort(_status_for(item), str(item))
                last = item
                if last.finish_reason == "error":
                    await context.abort(grpc.StatusCode.INTERNAL, "the engine failed this request (see the server log)")
                new, matched = split_stop_token(last.token_ids, last, params, eos, keep)
                generated += new
                if request.stream and new:
                    yield self._response(rid, last, new, complete=False)
                if last.finished:
                    yield self._response(rid, last, generated, complete=True, matched=matched)
                    return
        finally:
            if self._pumps.get(rid) is pump:
                del self._pumps[rid]
            if not pump.done():  # the client cancelled the call: abort the engine request
                pump.cancel()

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        pump = self._pumps.get(request.request_id)
        if pump is None or pump.done():
            return pb.AbortResponse(success=False, message=f"request {request.request_id!r} is not running here")
        pump.cancel()
        return pb.AbortResponse(success=True, message=f"aborted {request.request_id!r}")

    # ---- health and metadata -------------------------------------------------------------------
    async def _alive(self) -> str | None:
        """None when the serving loop is stepping; otherwise why not.

        Busy: the scheduler's step counter must move. Idle: a one-token probe must finish.
        (A probe queued behind a full batch would make a loaded worker look dead.)
        """
        if self.engine.num_in_flight():
            before = self.engine.engine.last_stats.num_steps
            deadline = time.monotonic() + HEALTH_TIMEOUT_S
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if self.engine.engine.last_stats.num_steps != before or not self.engine.num_in_flight():
                    return None
            return f"the engine took no step in {HEALTH_TIMEOUT_S:.0f} s"
        stream = self.engine.generate([0], SamplingParams(max_tokens=1, temperature=0.0))
        try:
            out = await asyncio.wait_for(stream.__anext__(), HEALTH_TIMEOUT_S)
            return None if out.finish_reason != "error" else "the engine failed a probe step"
        except (TimeoutError, asyncio.TimeoutError):
            return f"a one-token probe did not finish in {HEALTH_TIMEOUT_S:.0f} s"
        except (ValueError, QueueFullError, StopAsyncIteration) as exc:
            return f"the probe was refused: {exc}"
        finally:
            await stream.aclose()

    async def HealthCheck(self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
                          ) -> pb.HealthCheckResponse:
        if not self.engine.accepting:
            return pb.HealthCheckResponse(healthy=False, message="the server is shutting down")
        problem = await self._alive()
        return pb.HealthCheckResponse(healthy=problem is None, message=problem or "ok")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> pb.GetModelInfoResponse:
        i = self.info
        return pb.GetModelInfoResponse(
            model_path=i.model_path, tokenizer_path=i.tokenizer_path, served_model_name=i.model_name,
            model_type=i.model_type, architectures=i.architectures, max_context_length=i.max_model_len,
            max_req_input_len=i.max_model_len - 1, vocab_size=i.vocab_size, eos_token_ids=i.eos_token_ids,
            pad_token_id=i.pad_token_id, bos_token_id=i.bos_token_id, model_dtype=i.dtype,
        )

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> pb.GetServerInfoResponse:
        load = engine_load(self.engine)
        args, sched = Struct(), Struct()
        args.update({"model_path": self.info.model_path, "served_model_name": self.info.model_name,
                     "context_length": self.info.max_model_len, "page_size": self.info.page_size,
                     "max_running_requests": self.info.max_running_requests, "tp_size": 1, "dp_size": 1})
        sched.update({"max_total_num_tokens": load["max_total_num_tokens"], "max_req_input_len": self.info.max_model_len - 1})
        start = Timestamp()
        start.FromSeconds(int(self.started))
        return pb.GetServerInfoResponse(
            server_args=args, scheduler_info=sched, active_requests=self.engine.num_in_flight(),
            is_paused=not self.engine.accepting, uptime_seconds=time.time() - self.started,
            max_total_num_tokens=load["max_total_num_tokens"], tokenspeed_version=VERSION, start_time=start,
        )

    async def GetLoads(self, request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadsResponse:
        load = engine_load(self.engine)
        sections = set(request.include) or {"core"}
        rank = pb.SchedulerLoad(**load)
        if sections & {"all", "memory"}:
            rank.memory.CopyFrom(pb.MemoryMetrics(token_capacity=load["max_total_num_tokens"]))
        if sections & {"all", "queues"}:
            rank.queues.CopyFrom(pb.QueueMetrics(waiting=load["num_waiting_reqs"]))
        loads = [] if request.HasField("dp_rank") and request.dp_rank != 0 else [rank]
        aggregate = pb.AggregateMetrics(
            total_running_reqs=sum(r.num_running_reqs for r in loads), total_waiting_reqs=sum(r.num_waiting_reqs for r in loads),
            total_reqs=sum(r.num_total_reqs for r in loads), avg_token_usage=loads[0].token_usage if loads else 0.0,
        )
        return pb.GetLoadsResponse(timestamp=datetime.now(timezone.utc).isoformat(), version=f"tokenspeed-{VERSION}",
                                   dp_rank_count=1, loads=loads, aggregate=aggregate)

    # ---- admin ---------------------------------------------------------------------------------
    async def FlushCache(self, request: common_pb2.FlushCacheRequest, context: grpc.aio.ServicerContext
                         ) -> common_pb2.FlushCacheResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "flushing the prefix cache: the scheduler has no flush operation yet")

    async def StartProfile(self, request: common_pb2.StartProfileRequest, context: grpc.aio.ServicerContext
                           ) -> common_pb2.ProfileResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling: this server has no profiler hook")

    async def StopProfile(self, request: common_pb2.StopProfileRequest, context: grpc.aio.ServicerContext
                          ) -> common_pb2.ProfileResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling: this server has no profiler hook")

    async def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[common_pb2.KvEventBatch]:
        # The gateway then keeps its own approximate prefix tree per worker (cache_aware still works).
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "KV cache events: the scheduler does not publish them yet")
        yield common_pb2.KvEventBatch()  # unreachable; makes this an async generator like the RPC's shape

    def _tokenizer_dir(self) -> Path | None:
        for path in (self.info.tokenizer_path, self.info.model_path):
            if has_tokenizer_files(path):
                return Path(path)
        if not hasattr(self.info.tokenizer, "save_pretrained"):
            return None
        if self._exported is None:  # e.g. a tokenizer read from GGUF metadata: write it out once
            self._exported = tempfile.TemporaryDirectory(prefix="tokenspeed-tokenizer-")
            self.info.tokenizer.save_pretrained(self._exported.name)
        return Path(self._exported.name)

    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        directory = await asyncio.to_thread(self._tokenizer_dir)
        if directory is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this server has no Hugging Face tokenizer to share; give the gateway --tokenizer-path")
        data = await asyncio.to_thread(tokenizer_zip, directory)
        digest = hashlib.sha256(data).hexdigest()
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            end = min(start + TOKENIZER_CHUNK_BYTES, len(data))
            yield common_pb2.GetTokenizerChunk(data=data[start:end], sha256=digest if end == len(data) else "")


def tokenizer_zip(directory: Path) -> bytes:
    """The tokenizer files of ``directory`` as a zip (the GetTokenizer bundle format)."""
    names = {n for n in TOKENIZER_FILES if (directory / n).is_file()}
    names |= {p.name for pattern in TOKENIZER_GLOBS for p in directory.glob(pattern) if p.is_file()}
    if not names:
        raise FileNotFoundError(f"no tokenizer files in {directory}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(names):
            zf.write(directory / name, name)
    return buf.getvalue()


class GrpcServer:
    """A started grpc.aio server with the scheduler and health services; ``port`` is the bound port."""

    def __init__(self, service: TokenSpeedSchedulerService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        pb_grpc.add_TokenSpeedSchedulerServicer_to_server(service, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC server to {address}")

    async def start(self) -> GrpcServer:
        await self.server.start()
        return self

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, let running streams finish for up to ``grace_s``, then close."""
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)


def serve_http_and_grpc(server: OpenAIServer, host: str, port: int, grpc_port: int, drain_seconds: int = 30) -> None:
    """Serve the OpenAI HTTP API and the gRPC service from one event loop until SIGTERM/SIGINT."""
    from tokenspeed_engine.server.app_runner import make_uvicorn

    async def main() -> None:
        grpc_server = await GrpcServer(TokenSpeedSchedulerService.from_server(server), host, grpc_port).start()
        log.info("TokenSpeedScheduler gRPC service on %s:%d", host, grpc_server.port)
        if server.api_key and host not in ("127.0.0.1", "localhost", "::1"):
            # smg's gRPC client sends no credentials, so this port cannot ask for the API key
            log.warning("the gRPC service on %s:%d has no authentication; only the HTTP API checks the key",
                        host, grpc_server.port)
        # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler it found: make
        # that one a no-op so the gRPC drain and the engine shutdown below still run.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        try:
            await make_uvicorn(server, host, port, drain_seconds).serve()
        finally:
            server.engine.accepting = False
            await grpc_server.stop(drain_seconds)

    try:
        asyncio.run(main())
    finally:
        server.engine.shutdown()
