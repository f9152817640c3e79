"""Bridge between asyncio request handlers and the engine's serving thread.

Handlers call ``generate`` and iterate its outputs; one background thread runs
``Engine.step`` while there is work. A bound on queued + running requests turns
overload into an immediate QueueFullError (HTTP 429) instead of unbounded growth.
Cancelling a generator (client gone) aborts its request, so its pages return.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator

from tokenspeed_engine.engine import Engine, RequestOutput
from tokenspeed_engine.sampling import SamplingParams
from tokenspeed_engine.server.metrics import Metrics

log = logging.getLogger("tokenspeed.server")


class QueueFullError(RuntimeError):
    """Too many requests in flight; retry later."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_pending_requests: int = 256) -> None:
        self.engine = engine
        self.max_pending = max_pending_requests
        self.metrics = Metrics()
        if getattr(engine, "spec", None) is not None:  # speculative decoding: acceptance length and counters
            self.metrics.sources.append(engine.spec.stats.prometheus_lines)
        self._ids = itertools.count(1)
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.accepting = True
        self._thread = threading.Thread(target=self._loop, name="tokenspeed-engine", daemon=True)
        self._thread.start()

    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop:
            if self.engine.num_unfinished() == 0:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a failed step must not kill the server silently
                log.exception("engine step failed; aborting in-flight requests")
                outputs = self._fail_all()
            for out in outputs:
                self._deliver(out)

    def _fail_all(self) -> list[RequestOutput]:
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self.engine.abort(rid)
        return [RequestOutput(rid, [], "", True, "error") for rid in ids]

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            entry = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, out)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield outputs until the request finishes; raises ValueError / QueueFullError up front."""
        if not self.accepting:
            raise QueueFullError("the server is shutting down")
        with self._lock:
            if len(self._streams) >= self.max_pending:
                self.metrics.inc("tokenspeed_requests_rejected_total")
                raise QueueFullError(f"{len(self._streams)} requests in flight (limit {self.max_pending})")
            rid = next(self._ids)
            queue: asyncio.Queue = asyncio.Queue()
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.add_request(rid, prompt_ids, params)
        except Exception:
            with self._lock:
                self._streams.pop(rid, None)
            raise
        self.metrics.inc("tokenspeed_requests_total")
        self._wake.set()
        start = last = time.monotonic()
        first = True
        finished = False
        try:
            while True:
                out: RequestOutput = await queue.get()
                now = time.monotonic()
                if out.token_ids:
                    with self.metrics.lock:
                        (self.metrics.ttft if first else self.metrics.itl).observe(now - (start if first else last))
                    first, last = False, now
                if out.finished:
                    finished = True
                    self.metrics.inc("tokenspeed_prompt_tokens_total", out.prompt_tokens)
                    self.metrics.inc("tokenspeed_cached_prompt_tokens_total", out.cached_tokens)
                    self.metrics.inc("tokenspeed_generation_tokens_total", out.completion_tokens)
                yield out
                if out.finished:
                    return
        finally:
            if not finished:  # the consumer went away (client disconnect, cancellation)
                with self._lock:
                    self._streams.pop(rid, None)
                self.engine.abort(rid)
                self._wake.set()

    def gauges(self) -> dict[str, float]:
        stats = self.engine.last_stats
        hit = stats.prefix_hit_tokens / stats.prefix_lookup_tokens if stats.prefix_lookup_tokens else 0.0
        return {
            "tokenspeed_num_requests_running": stats.num_running,
            "tokenspeed_num_requests_waiting": stats.num_waiting,
            "tokenspeed_kv_pages_total": stats.pages_total,
            "tokenspeed_kv_pages_used": stats.pages_used,
            "tokenspeed_kv_pages_cached": stats.pages_cached,
            "tokenspeed_kv_usage_ratio": stats.pages_used / stats.pages_total if stats.pages_total else 0.0,
            "tokenspeed_prefix_cache_hit_ratio": hit,
        }
