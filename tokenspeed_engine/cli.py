"""``tokenspeed serve``: the OpenAI-compatible server (defaults: the embedded model, 127.0.0.1)."""

from __future__ import annotations

import argparse
import logging
import sys

from tokenspeed_kernels import env

log = logging.getLogger("tokenspeed")


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
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    s.add_argument("--dp", type=int, default=1, help="data-parallel replicas (behind the smg gateway)")
    s.add_argument("--gateway", action="store_true", help="start the smg gateway in front")
    s.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's, capped at 8192 on CPU)")
    s.add_argument("--page-size", type=int, default=16)
    s.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in tokens (default: from free memory)")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--max-running-requests", type=int, default=64)
    s.add_argument("--max-pending-requests", type=int, default=256, help="beyond this, requests get HTTP 429")
    s.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get HTTP 413")
    return parser


def serve(args: argparse.Namespace) -> int:
    from tokenspeed_engine.launch import build_server

    if args.tp != 1 or args.dp != 1 or args.gateway:
        print("tokenspeed serve: --tp, --dp and --gateway are not available in this build yet", file=sys.stderr)
        return 2
    api_key = args.api_key or env.get(env.API_KEY) or None
    engine, server = build_server(args, api_key)
    from tokenspeed_engine.server.app_runner import serve_forever

    where = f"http://{args.host}:{args.port}/v1"
    log.info("serving %s at %s%s", server.model_name, where, " (API key required)" if api_key else "")
    serve_forever(engine, server, args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.cmd == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
