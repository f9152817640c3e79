"""Helpers for the gateway tests: a HF tokenizer that agrees with the toy model, and a toy replica.

The smg gateway tokenises by itself in gRPC mode, so it needs a real Hugging Face tokenizer
whose ids are the toy model's: a byte-level BPE with no merges where token id == byte value
(id 0, the toy EOS, is the special ``<eos>``), and a chat template that renders exactly what
``ByteTokenizer.chat`` encodes.

``python -m tests.engine.gateway_toy replica --port P --grpc-port G --tokenizer-dir D`` serves a
toy engine over HTTP and gRPC (a replica process for tokenspeed_engine.server.gateway);
``... gateway --port P --dp N --mode grpc|http --tokenizer-dir D`` runs that gateway over them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from tests.engine.toy_model import EOS, VOCAB, ByteTokenizer, toy_engine

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MODEL = "toy"


def _byte_chars() -> dict[int, str]:
    """The ByteLevel pre-tokenizer's byte -> char map (GPT-2's): printable bytes map to themselves,
    the others to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def save_byte_tokenizer(directory: str) -> str:
    """Write the toy's tokenizer (tokenizer.json + config with the chat template) into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    vocab = {chars[b]: b for b in range(1, VOCAB)}
    vocab["<eos>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def check_agrees(directory: str) -> None:
    """Fail loudly if the saved tokenizer and ByteTokenizer disagree (the tests rely on it)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(directory)
    msgs = [{"role": "user", "content": "hi there"}]
    text = "The capital of France is"
    assert hf.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    assert list(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)) == \
        ByteTokenizer().chat(msgs)
    assert hf.eos_token_id == EOS


def toy_worker_info(server, tokenizer_dir: str, export: bool):
    """WorkerInfo of a toy server whose tokenizer lives in ``tokenizer_dir``.

    ``export``: the paths the gateway sees hold no tokenizer files (model_path is an empty
    directory, like a GGUF checkpoint's), so it falls back to GetTokenizer, which exports the
    HF tokenizer object.
    """
    from transformers import AutoTokenizer

    from tokenspeed_engine.server.worker_api import describe

    info = describe(server)
    info.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if export:
        info.model_path, info.tokenizer_path = tempfile.mkdtemp(prefix="toy-model-"), ""
    else:
        info.model_path = info.tokenizer_path = tokenizer_dir
    return info


class GrpcHarness:
    """A toy AsyncEngine behind the gRPC service on a loopback port, its event loop on a thread
    (the test talks to it with a plain synchronous grpc client)."""

    def __init__(self, tokenizer_dir: str | None = None, max_pending: int = 256, **engine_kwargs) -> None:
        import asyncio
        import threading

        from tokenspeed_engine.server.async_engine import AsyncEngine
        from tokenspeed_engine.server.grpc_service import GrpcServer, TokenSpeedSchedulerService
        from tokenspeed_engine.server.openai_api import OpenAIServer

        tok = ByteTokenizer()
        self.engine = AsyncEngine(toy_engine(**engine_kwargs), max_pending_requests=max_pending)
        server = OpenAIServer(self.engine, MODEL, tok.encode, tok.chat)
        if tokenizer_dir:
            server.worker_info = toy_worker_info(server, tokenizer_dir, export=True)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        service = TokenSpeedSchedulerService.from_server(server)
        self.server = asyncio.run_coroutine_threadsafe(self._start(GrpcServer, service), self.loop).result(10)
        self.address = f"127.0.0.1:{self.server.port}"

    async def _start(self, cls, service):
        return await cls(service).start()

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.stop(1), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.engine.shutdown()


def serve_replica(args: argparse.Namespace) -> None:
    from tokenspeed_engine.server.async_engine import AsyncEngine
    from tokenspeed_engine.server.grpc_service import serve_http_and_grpc
    from tokenspeed_engine.server.openai_api import OpenAIServer

    tok = ByteTokenizer()
    server = OpenAIServer(AsyncEngine(toy_engine()), MODEL, tok.encode, tok.chat, api_key=args.api_key)
    server.worker_info = toy_worker_info(server, args.tokenizer_dir, args.export_tokenizer)
    serve_http_and_grpc(server, "127.0.0.1", args.port, args.grpc_port, drain_seconds=5)


def replica_command(tokenizer_dir: str, export: bool = False):
    """Gateway replica_command for toy replicas (each one this module in its own process)."""
    def command(index: int, http_port: int, grpc_port: int | None) -> list[str]:
        grpc_port = grpc_port if grpc_port is not None else 0  # HTTP mode: an ephemeral, unused gRPC port
        return [sys.executable, "-m", "tests.engine.gateway_toy", "replica", "--port", str(http_port),
                "--grpc-port", str(grpc_port), "--tokenizer-dir", tokenizer_dir, *(["--export-tokenizer"] if export else [])]
    return command


def run_gateway(args: argparse.Namespace) -> int:
    from tokenspeed_engine.server.gateway import Gateway, GatewayConfig

    cfg = GatewayConfig(port=args.port, mode=args.mode, worker_base_port=args.worker_base_port, drain_seconds=2,
                        startup_timeout_s=60, api_key=args.api_key)
    key_env = {"TOKENSPEED_API_KEY": args.api_key} if args.api_key else {}
    return Gateway(cfg, args.dp, replica_command(args.tokenizer_dir, args.export_tokenizer), lambda i: key_env).run()


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("replica", help="one toy engine over HTTP + gRPC")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--grpc-port", type=int, required=True)
    g = sub.add_parser("gateway", help="tokenspeed_engine.server.gateway over toy replicas")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--worker-base-port", type=int, default=None)
    g.add_argument("--dp", type=int, default=2)
    g.add_argument("--mode", default="grpc")
    for q in (r, g):
        q.add_argument("--api-key", default=os.environ.get("TOKENSPEED_API_KEY"))
        q.add_argument("--tokenizer-dir", required=True, help="the toy's HF tokenizer (save_byte_tokenizer)")
        q.add_argument("--export-tokenizer", action="store_true",
                       help="report no tokenizer path, so a gRPC gateway must fetch it over GetTokenizer")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.what == "gateway" else logging.WARNING)
    if args.what == "replica":
        serve_replica(args)
        return 0
    return run_gateway(args)


if __name__ == "__main__":
    sys.exit(main())
