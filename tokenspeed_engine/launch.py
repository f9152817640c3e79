"""Assemble a serving stack from a model path: tokenizer, model, KV pool, engine, server.

The KV pool is sized from a token budget on CPU, or from free GPU memory
(``--gpu-memory-utilization``); the startup log states the kernels the registry chose
and the pool size in tokens.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch

from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.model_runner import TorchModelRunner
from tokenspeed_engine.tokenizer import LoadedTokenizer, default_model_path, load_tokenizer

log = logging.getLogger("tokenspeed.launch")

CPU_MAX_MODEL_LEN = 8192
CPU_DEFAULT_KV_TOKENS = 16384
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _kv_bytes_per_token(model: Any, page_size: int) -> int:
    probe = model.make_kv_cache(1, page_size, device="meta")
    tensors = [t for layer in range(len(probe)) for t in _as_tuple(probe[layer])]
    return sum(t.numel() * t.element_size() for t in tensors) // page_size


def _as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _num_pages(model: Any, device: torch.device, page_size: int, kv_tokens: int | None, utilization: float) -> int:
    per_token = _kv_bytes_per_token(model, page_size)
    if kv_tokens is None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = free - (1.0 - utilization) * total
            if budget <= 0:
                raise RuntimeError(f"no GPU memory left for the KV cache (free {free / 2**30:.1f} GiB)")
            kv_tokens = int(budget // per_token)
        else:
            kv_tokens = CPU_DEFAULT_KV_TOKENS
    pages = kv_tokens // page_size + 1  # + the null page
    log.info("KV pool: %d tokens (%d pages of %d, %.1f KiB per token)", (pages - 1) * page_size, pages, page_size,
             per_token / 1024)
    return pages


def _log_kernels(device: torch.device, dtype: torch.dtype) -> None:
    from tokenspeed_kernels import registry

    chosen = []
    for op in ("mla_decode", "mla_prefill", "moe_route", "fused_moe"):
        try:
            chosen.append(f"{op}={registry.select(op, device, dtype).backend}")
        except registry.NoKernelError:
            chosen.append(f"{op}=none")
    log.info("kernels on %s/%s: %s", device, str(dtype).replace("torch.", ""), ", ".join(chosen))


def build_engine(
    model_path: str | None = None,
    *,
    device: str | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    page_size: int = 16,
    kv_cache_tokens: int | None = None,
    gpu_memory_utilization: float = 0.9,
    engine_config: EngineConfig | None = None,
) -> tuple[Engine, LoadedTokenizer, str]:
    """Load ``model_path`` (default: the embedded SmolLM2) into an Engine; returns (engine, tokenizer, name)."""
    from tokenspeed_engine.models import load_model

    path = model_path or default_model_path()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    log.info("loading %s on %s in %s", path, dev, torch_dtype)
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=torch_dtype, device=dev)
    config = model.config
    limit = config.max_position_embeddings if dev.type == "cuda" else min(config.max_position_embeddings, CPU_MAX_MODEL_LEN)
    max_len = min(max_model_len or limit, config.max_position_embeddings)
    num_pages = _num_pages(model, dev, page_size, kv_cache_tokens, gpu_memory_utilization)
    kv_cache = model.make_kv_cache(num_pages, page_size, device=dev)
    _log_kernels(dev, torch_dtype)
    runner = TorchModelRunner(model, kv_cache, num_pages=num_pages, page_size=page_size, max_model_len=max_len,
                              vocab_size=config.vocab_size, device=dev)
    engine = Engine(runner, tokenizer, tokenizer.eos_token_ids, engine_config)
    name = os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
    return engine, tokenizer, name


def build_server(args: argparse.Namespace, api_key: str | None):
    """The AsyncEngine and OpenAIServer for ``tokenspeed serve``'s arguments."""
    from tokenspeed_engine.server.async_engine import AsyncEngine
    from tokenspeed_engine.server.openai_api import OpenAIServer

    engine, tokenizer, name = build_engine(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        page_size=args.page_size,
        kv_cache_tokens=args.kv_cache_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        engine_config=EngineConfig(args.max_num_batched_tokens, args.max_running_requests),
    )
    async_engine = AsyncEngine(engine, max_pending_requests=args.max_pending_requests)
    server = OpenAIServer(async_engine, args.served_model_name or name, tokenizer.encode, tokenizer.chat,
                          api_key=api_key, max_body_bytes=args.max_body_bytes)
    return async_engine, server
