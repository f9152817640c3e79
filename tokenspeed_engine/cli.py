"""``tokenspeed serve``: the OpenAI-compatible server (defaults: the embedded model, 127.0.0.1)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from tokenspeed_engine.server.gateway import POLICIES
from tokenspeed_kernels import env

log = logging.getLogger("tokenspeed")

# The same values as tokenspeed_engine.launch's (not imported: `tokenspeed --help` stays free of torch).
DEFAULT_CUDA_GRAPH_MAX_BS = 64
LOAD_FORMATS = ("auto", "random")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenspeed")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a model over the OpenAI API")
    s.add_argument("--model", default=None, help="model directory (HF safetensors) or .gguf file; default: SmolLM2-135M")
    s.add_argument("--served-model-name", default=None, help="name reported by /v1/models (default: from --model)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help=f"require this bearer token (or set {env.API_KEY})")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel size: processes (GPUs 0..N-1) sharing one model")
    s.add_argument("--dp", type=int, default=1, help="data-parallel replicas (behind the smg gateway)")
    s.add_argument("--gateway", action="store_true", help="start the smg gateway in front (implied by --dp > 1)")
    s.add_argument("--gateway-mode", default="grpc", choices=["grpc", "http"],
                   help="grpc: the gateway tokenises and templates, replicas move token ids; http: it forwards OpenAI requests")
    s.add_argument("--gateway-policy", default="cache_aware", choices=POLICIES, help="smg routing policy across the replicas")
    s.add_argument("--worker-base-port", type=int, default=None,
                   help="first replica port behind the gateway (default --port + 1; consecutive from there)")
    s.add_argument("--grpc-port", type=int, default=None, help="also serve smg's TokenSpeedScheduler gRPC service on this port")
    s.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's, capped at 8192 on CPU)")
    s.add_argument("--page-size", type=int, default=16)
    s.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in tokens (default: from free memory)")
    s.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp8"],
                   help="KV cache element type: auto = the model's dtype; fp8 = e4m3 latent cache with a per-tensor "
                        "scale (MLA models), half the bytes per token, so twice the tokens in the same memory")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--max-running-requests", type=int, default=64)
    s.add_argument("--max-pending-requests", type=int, default=256, help="beyond this, requests get HTTP 429")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get HTTP 413")
    s.add_argument("--cuda-graph-max-bs", type=int, default=DEFAULT_CUDA_GRAPH_MAX_BS,
                   help="largest decode batch replayed from a CUDA graph (capped by --max-running-requests)")
    s.add_argument("--disable-cuda-graph", action="store_true", help="run every decode eagerly")
    s.add_argument("--enable-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="plan step t+1 while the GPU runs step t (default: on for CUDA, off on the CPU)")
    s.add_argument("--speculative-num-steps", type=int, default=0,
                   help="draft this many tokens per step with the model's MTP (NextN) layer and verify them in one "
                        "forward (0: off; at most 7; turns overlap off)")
    s.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="random: read only config.json and the tokenizer, draw random weights (benchmarks)")
    return parser


# serve options that configure the gateway process itself, not the replicas behind it
GATEWAY_ONLY = {"cmd", "host", "port", "api_key", "dp", "gateway", "gateway_mode", "gateway_policy", "worker_base_port",
                "grpc_port"}
NEGATABLE = {"enable_overlap"}  # --x / --no-x flags: False must travel as --no-x


def replica_argv(args: argparse.Namespace) -> list[str]:
    """The ``serve`` options a replica inherits, as argv (``--name value``; a set flag as ``--name``)."""
    argv: list[str] = []
    for name, value in vars(args).items():
        flag = name.replace("_", "-")
        if name in NEGATABLE and value is False:
            argv.append(f"--no-{flag}")
            continue
        if name in GATEWAY_ONLY or value is None or value is False:
            continue
        argv += [f"--{flag}"] + ([] if value is True else [str(value)])
    return argv


def serve_gateway(args: argparse.Namespace, api_key: str | None) -> int:
    """--dp N replicas (``tokenspeed serve`` processes on loopback) behind the smg gateway."""
    from tokenspeed_engine.server.gateway import Gateway, GatewayConfig, GatewayError, replica_env

    cfg = GatewayConfig(host=args.host, port=args.port, mode=args.gateway_mode, policy=args.gateway_policy,
                        worker_base_port=args.worker_base_port, api_key=api_key)
    common = replica_argv(args)

    def command(index: int, http_port: int, grpc_port: int | None) -> list[str]:
        grpc = ["--grpc-port", str(grpc_port)] if grpc_port is not None else []
        return [sys.executable, "-m", "tokenspeed_engine.cli", "serve", *common, "--port", str(http_port), *grpc]

    def environment(index: int) -> dict[str, str]:  # the key travels in the environment, not in `ps` output
        return {**replica_env(index, args.tp, args.device), **({env.API_KEY: api_key} if api_key else {})}

    try:
        return Gateway(cfg, args.dp, command, environment).run()
    except GatewayError as exc:
        print(f"tokenspeed serve: {exc}", file=sys.stderr, flush=True)
        return 2


def serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or env.get(env.API_KEY) or None
    if args.gateway or args.dp != 1:
        return serve_gateway(args, api_key)
    if args.tp < 1:
        print(f"tokenspeed serve: --tp must be >= 1, got {args.tp}", file=sys.stderr)
        return 2
    if not 0 <= args.speculative_num_steps <= 7:
        print(f"tokenspeed serve: --speculative-num-steps must be in 0..7, got {args.speculative_num_steps}", file=sys.stderr)
        return 2
    if args.cuda_graph_max_bs < 1:
        print(f"tokenspeed serve: --cuda-graph-max-bs must be >= 1, got {args.cuda_graph_max_bs}", file=sys.stderr)
        return 2
    from tokenspeed_engine.launch import build_server

    engine, server = build_server(args, api_key)
    where = f"http://{args.host}:{args.port}/v1"
    log.info("serving %s at %s%s", server.model_name, where, " (API key required)" if api_key else "")
    # uvicorn drains on SIGTERM, then re-raises it with the handler found at start-up: with the
    # default one the process would die right there, before the cleanup below stops the workers.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    try:
        if args.grpc_port is not None:
            from tokenspeed_engine.server.grpc_service import serve_http_and_grpc

            serve_http_and_grpc(server, args.host, args.port, args.grpc_port)
            return 0
        from tokenspeed_engine.server.app_runner import serve_forever

        serve_forever(engine, server, args.host, args.port)
        return 0
    finally:
        engine.shutdown()  # idempotent: the serving loop has stopped; then stop tensor-parallel workers
        engine.engine.close()


def _exit_after_drain(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.cmd == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
