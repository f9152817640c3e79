"""``tokenspeed serve --gateway [--dp N]``: N engine replicas behind the smg gateway.

Each replica is its own process (``tokenspeed serve`` on loopback ports: HTTP on
``base .. base+N-1`` and, in gRPC mode, the TokenSpeedScheduler service on
``base+N .. base+2N-1``); then ``python -m smg.launch_router`` (smg's Rust router, PyPI
``smg``) listens on ``--host:--port`` with a cache-aware policy across them. In gRPC mode
the gateway tokenises, applies chat templates and parses tools/reasoning itself (it gets
the tokenizer from the replicas' model info or their GetTokenizer RPC); in HTTP mode it
forwards OpenAI requests to the replicas and routes on the request text.

Shutdown (SIGTERM/SIGINT to this process): the gateway stops first (no new requests, lets
in-flight ones finish), then the replicas drain; whatever is still alive after the drain
window is killed. Children also get SIGTERM if this process dies (Linux PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("tokenspeed.gateway")

MODES = ("grpc", "http")
POLICIES = ("cache_aware", "round_robin", "power_of_two", "least_load", "random", "consistent_hashing", "prefix_hash")
ReplicaCommand = Callable[[int, int, "int | None"], list[str]]  # (index, http port, grpc port) -> argv


class GatewayError(RuntimeError):
    """The gateway cannot start or lost a child; the message says what to do."""


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"  # where the gateway listens (loopback unless asked otherwise)
    port: int = 8000
    mode: str = "grpc"
    policy: str = "cache_aware"
    worker_base_port: int | None = None  # first replica port; default port + 1
    api_key: str | None = None  # clients must send it to the gateway; it sends it to the replicas
    startup_timeout_s: float = 900.0  # replicas load their model before they answer /health
    drain_seconds: int = 30
    log_level: str = "warn"


def require_smg(mode: str) -> None:
    """Raise GatewayError naming the missing packages (smg itself, and the gRPC stack in gRPC mode)."""
    needed = {"smg": "smg"}
    if mode == "grpc":
        needed.update({"grpc": "grpcio", "grpc_health": "grpcio-health-checking", "smg_grpc_proto": "smg-grpc-proto"})
    missing = [pkg for module, pkg in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise GatewayError(f"--gateway needs {', '.join(missing)}: `pip install {' '.join(missing)}` "
                           "(make setup installs them)")


def replica_ports(cfg: GatewayConfig, dp: int) -> list[tuple[int, int | None]]:
    """(http port, grpc port or None) per replica: consecutive ports from worker_base_port."""
    base = cfg.worker_base_port if cfg.worker_base_port is not None else cfg.port + 1
    return [(base + i, base + dp + i if cfg.mode == "grpc" else None) for i in range(dp)]


def check_ports_free(host: str, ports: list[int]) -> None:
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            # as the servers will: a listener conflicts, a closed connection in TIME_WAIT does not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise GatewayError(f"port {port} on {host} is not free ({exc.strerror}); "
                                   "choose others with --port / --worker-base-port") from exc


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def router_command(cfg: GatewayConfig, worker_urls: list[str], prometheus_port: int) -> list[str]:
    """The smg launcher's argv (PyPI smg 1.13: ``python -m smg.launch_router``)."""
    cmd = [sys.executable, "-m", "smg.launch_router", "--worker-urls", *worker_urls,
           "--host", cfg.host, "--port", str(cfg.port), "--policy", cfg.policy,
           # its metrics listener defaults to 0.0.0.0:29000: keep it on loopback, on a free port
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port),
           "--shutdown-grace-period-secs", str(cfg.drain_seconds), "--log-level", cfg.log_level,
           "--worker-startup-timeout-secs", str(int(cfg.startup_timeout_s))]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    return cmd


def replica_env(index: int, per_replica: int, device: str | None) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for replica ``index`` (``per_replica`` GPUs each); {} on CPU."""
    if device == "cpu":
        return {}
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        import torch

        visible = [str(i) for i in range(torch.cuda.device_count())]
    if not visible:
        return {}  # no GPU: every replica runs on the CPU
    need = (index + 1) * per_replica
    if need > len(visible):
        raise GatewayError(f"replica {index} needs GPUs {need - per_replica}..{need - 1} but {len(visible)} are visible")
    return {"CUDA_VISIBLE_DEVICES": ",".join(visible[index * per_replica:need])}


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies, however it dies
    (Linux PR_SET_PDEATHSIG; it fires when the spawning thread exits, so spawn from the main thread).
    libc is loaded here, in the parent: the child only makes the one call before exec."""
    libc_name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not libc_name:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Gateway:
    """Owns the replica processes and the smg process; ``run`` blocks until a signal or a failure."""

    def __init__(self, cfg: GatewayConfig, dp: int, replica_command: ReplicaCommand,
                 replica_env: Callable[[int], dict[str, str]] | None = None) -> None:
        if cfg.mode not in MODES:
            raise GatewayError(f"gateway mode must be one of {MODES}, got {cfg.mode!r}")
        if dp < 1:
            raise GatewayError(f"--dp must be at least 1, got {dp}")
        self.cfg, self.dp = cfg, dp
        self.replica_command, self.replica_env = replica_command, replica_env or (lambda i: {})
        self.ports = replica_ports(cfg, dp)
        self.url = _url("http", cfg.host, cfg.port)
        self.replicas: list[subprocess.Popen] = []
        self.router: subprocess.Popen | None = None
        self.stopping = threading.Event()

    # ---- start ---------------------------------------------------------------------------------
    def worker_urls(self) -> list[str]:
        if self.cfg.mode == "grpc":
            return [_url("grpc", "127.0.0.1", g) for _, g in self.ports if g is not None]
        return [_url("http", "127.0.0.1", h) for h, _ in self.ports]

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        # Own session: a terminal's Ctrl-C reaches only this process, which then stops the
        # children in order (gateway first) instead of all of them at once.
        full_env = {**os.environ, **(env or {})}
        return subprocess.Popen(argv, env=full_env, start_new_session=True, preexec_fn=_parent_death_signal())

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not ready():
            self._check_children()
            if self.stopping.is_set():
                raise GatewayError(f"stopped while waiting for {what}")
            if time.monotonic() > deadline:
                raise GatewayError(f"{what} not ready after {self.cfg.startup_timeout_s:.0f} s")
            time.sleep(0.1)

    def _get_ok(self, url: str, check: Callable[[object], bool] = lambda r: True) -> bool:
        import httpx  # here, so that the CLI can import POLICIES cheaply

        try:
            r = httpx.get(url, headers=self._headers(), timeout=2.0)
            return r.status_code == 200 and check(r)
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        require_smg(self.cfg.mode)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
        flat = [p for pair in self.ports for p in pair if p is not None]
        check_ports_free("127.0.0.1", flat)
        check_ports_free(self.cfg.host, [self.cfg.port])
        for i, (http_port, grpc_port) in enumerate(self.ports):
            self.replicas.append(self._spawn(self.replica_command(i, http_port, grpc_port), self.replica_env(i)))
        log.info("started %d replica(s) on ports %s; waiting for them to load", self.dp, flat)
        for http_port, _ in self.ports:
            health = _url("http", "127.0.0.1", http_port) + "/health"
            self._wait(f"replica on port {http_port}", lambda u=health: self._get_ok(u))
        self.router = self._spawn(router_command(self.cfg, self.worker_urls(), _free_port()))
        # /readiness: every worker registered and healthy, and (gRPC mode) the tokenizer loaded
        self._wait("the smg gateway", lambda: self._get_ok(
            self.url + "/readiness", lambda r: r.json().get("healthy_workers") == self.dp))
        log.info("smg gateway (%s mode, %s policy) serving %d replica(s) at %s/v1",
                 self.cfg.mode, self.cfg.policy, self.dp, self.url)

    # ---- run / stop ----------------------------------------------------------------------------
    def _check_children(self) -> None:
        for name, proc in [("smg", self.router), *((f"replica {i}", p) for i, p in enumerate(self.replicas))]:
            if proc is not None and proc.poll() is not None and not self.stopping.is_set():
                raise GatewayError(f"{name} (pid {proc.pid}) exited with code {proc.returncode}")

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT (0) or until a child dies (1)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self.stopping.wait(0.2):
                self._check_children()
            return 0
        except GatewayError as exc:
            log.error("%s", exc)
            return 1
        finally:
            self.shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def shutdown(self) -> None:
        """The gateway first (it drains its in-flight requests), then the replicas; kill stragglers."""
        self.stopping.set()
        if self.router is not None:
            _terminate([self.router], self.cfg.drain_seconds + 5)
        _terminate(self.replicas, self.cfg.drain_seconds + 10)

    def __enter__(self) -> Gateway:
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _terminate(procs: list[subprocess.Popen], timeout_s: float) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not exit within %.0f s; killing it", p.pid, timeout_s)
            p.kill()
            p.wait()
