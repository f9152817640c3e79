"""Run the HTTP server in-process: used by the CLI and by the tests (on a free port)."""

from __future__ import annotations

import random
import socket
import threading
import time

import uvicorn

from tokenspeed_engine.server.async_engine import AsyncEngine
from tokenspeed_engine.server.openai_api import OpenAIServer, build_app


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_block(count: int, host: str = "127.0.0.1", seed: int | None = None) -> int:
    """First of ``count`` consecutive ports that are all free now (for ``--worker-base-port``).

    Drawn below Linux's ephemeral range (32768+), where ``free_port`` and every outgoing
    connection take theirs, so a neighbour of a free port is not someone's client socket.
    """
    rng = random.Random(seed)
    for _ in range(200):
        base = rng.randrange(20_000, 32_000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise OSError(f"no {count} consecutive free ports on {host} in 20000..32000")


def make_uvicorn(server: OpenAIServer, host: str, port: int, drain_seconds: int = 30) -> uvicorn.Server:
    """A uvicorn server that stops accepting and drains in-flight requests on SIGTERM/SIGINT."""
    config = uvicorn.Config(
        build_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_seconds
    )

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            server.engine.accepting = False
            super().handle_exit(sig, frame)

    return Draining(config)


class BackgroundServer:
    """Start a server on a thread; ``url`` is its base address. For tests and embedding."""

    def __init__(self, server: OpenAIServer, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._uv = make_uvicorn(server, host, self.port)
        self._uv.install_signal_handlers = lambda: None  # signals belong to the main thread
        self._thread = threading.Thread(target=self._uv.run, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uv.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._uv.should_exit = True
        self._thread.join(timeout=30)


def serve_forever(engine: AsyncEngine, server: OpenAIServer, host: str, port: int) -> None:
    make_uvicorn(server, host, port).run()
    engine.shutdown()
