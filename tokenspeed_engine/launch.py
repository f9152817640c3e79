"""Assemble a serving stack from a model path: tokenizer, model, KV pool, engine, server.

The KV pool is sized from a token budget on CPU, or from free GPU memory
(``--gpu-memory-utilization``); the startup log states the kernels the registry chose,
the pool size in tokens, the decode batch sizes captured as CUDA graphs and whether the
one-step overlap is on. With ``tp > 1`` the model is split over that many processes
(:mod:`tokenspeed_engine.tp_worker`); each builds its runner with :func:`build_runner`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.kv_cache import KV_CACHE_DTYPES, set_kv_cache_dtype
from tokenspeed_engine.model_runner import TorchModelRunner
from tokenspeed_engine.tokenizer import LoadedTokenizer, default_model_path, load_tokenizer

log = logging.getLogger("tokenspeed.launch")

CPU_MAX_MODEL_LEN = 8192
CPU_DEFAULT_KV_TOKENS = 16384
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LOAD_FORMATS = ("auto", "random")
DEFAULT_CUDA_GRAPH_MAX_BS = 64


@dataclasses.dataclass(frozen=True)
class RunnerOptions:
    """What every rank needs to build its runner (picklable: tensor-parallel workers receive it)."""

    model_path: str
    device: str  # "cpu" or "cuda" (rank r of a tensor-parallel group uses GPU r)
    dtype: str  # a key of DTYPES
    max_model_len: int | None
    page_size: int
    kv_cache_tokens: int | None
    gpu_memory_utilization: float
    cuda_graph_max_bs: int  # 0: no CUDA graphs
    load_format: str  # "auto": the checkpoint's weights; "random": config.json only, random weights
    random_mtp_layers: int = 0  # load_format "random" with speculative decoding: NextN layers to build
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "bf16" or "fp8" (e4m3 latent cache, MLA models)


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


def _log_kernels(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> None:
    from tokenspeed_kernels import registry

    chosen = []
    for op in ("mla_decode", "mla_prefill", "mla_latent_write", "moe_route", "fused_moe"):
        traits = {"kv_dtype": kv_dtype} if op == "mla_decode" else {}  # an fp8 cache has its own decode kernels
        try:
            chosen.append(f"{op}={registry.select(op, device, dtype, **traits).backend}")
        except registry.NoKernelError:
            chosen.append(f"{op}=none")
    log.info("kernels on %s/%s: %s", device, str(dtype).replace("torch.", ""), ", ".join(chosen))


def _load(opts: RunnerOptions, device: torch.device, parallel: Any, progress: bool) -> Any:
    from tokenspeed_engine.models import config_from_hf, load_model
    from tokenspeed_engine.models.configs import build_random_model

    dtype = DTYPES[opts.dtype]
    if opts.load_format == "random":
        config_file = Path(opts.model_path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--load-format random needs {config_file}")
        config = config_from_hf(json.loads(config_file.read_text()))
        log.info("random weights for the %s of %s", type(config).__name__, opts.model_path)
        if opts.random_mtp_layers:  # speculative decoding hook: the draft layer too
            from tokenspeed_engine.models.deepseek_mtp import build_random_mtp_model

            return build_random_mtp_model(config, dtype=dtype, device=device, num_mtp_layers=opts.random_mtp_layers)
        return build_random_model(config, dtype=dtype, device=device, seed=0, parallel=parallel)
    return load_model(opts.model_path, dtype=dtype, device=device, parallel=parallel, progress=progress)


def build_runner(
    opts: RunnerOptions, device: torch.device, parallel: Any = None, agree_pages: Any = None
) -> TorchModelRunner:
    """Load the model (this rank's shard under ``parallel``), allocate its KV pool and capture its
    decode graphs. ``agree_pages(n)`` returns the page count all ranks settle on (the minimum)."""
    rank = parallel.rank if parallel is not None else 0
    model = _load(opts, device, parallel, progress=rank == 0)
    set_kv_cache_dtype(model, opts.kv_cache_dtype)  # before sizing: fp8 halves the bytes per token
    config = model.config
    limit = config.max_position_embeddings
    if device.type != "cuda":
        limit = min(limit, CPU_MAX_MODEL_LEN)
    max_len = min(opts.max_model_len or limit, config.max_position_embeddings)
    num_pages = _num_pages(model, device, opts.page_size, opts.kv_cache_tokens, opts.gpu_memory_utilization)
    if agree_pages is not None:
        num_pages = agree_pages(num_pages)
    kv_cache = model.make_kv_cache(num_pages, opts.page_size, device=device)
    if rank == 0:
        _log_kernels(device, DTYPES[opts.dtype], getattr(model, "kv_cache_dtype", None))
    return TorchModelRunner(
        model,
        kv_cache,
        num_pages=num_pages,
        page_size=opts.page_size,
        max_model_len=max_len,
        vocab_size=config.vocab_size,
        device=device,
        cuda_graph_max_bs=opts.cuda_graph_max_bs,
    )


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
    tp: int = 1,
    cuda_graph_max_bs: int = DEFAULT_CUDA_GRAPH_MAX_BS,
    disable_cuda_graph: bool = False,
    enable_overlap: bool | None = None,
    load_format: str = "auto",
    speculative_num_steps: int | None = None,
    kv_cache_dtype: str = "auto",
) -> tuple[Engine, LoadedTokenizer, str]:
    """Load ``model_path`` (default: the embedded SmolLM2) into an Engine; returns (engine, tokenizer, name).

    ``tp``: tensor-parallel ranks (processes; GPUs 0..tp-1 on CUDA). CUDA graphs cover decode
    batches up to ``cuda_graph_max_bs`` (capped by the engine's running requests) unless
    disabled; they are never used on the CPU. ``enable_overlap`` None means on for CUDA, off
    on the CPU (nothing runs asynchronously there). ``load_format="random"`` reads only
    config.json (and the tokenizer) and draws random weights: for benchmarks without a checkpoint.
    Call ``engine.close()`` to stop tensor-parallel workers. ``speculative_num_steps`` k > 0
    (default: the engine config's) drafts k tokens per step with the model's MTP layer
    (:mod:`tokenspeed_engine.speculative`); overlap is then off and the CUDA graphs cover the
    verify step instead of the plain decode. ``kv_cache_dtype`` "fp8" keeps an MLA model's latent
    cache in e4m3 with a per-tensor scale: twice the tokens in the same memory.
    """
    path = model_path or default_model_path()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    elif dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if cuda_graph_max_bs < 1 and not disable_cuda_graph:
        raise ValueError(f"cuda_graph_max_bs must be >= 1 (or disable CUDA graphs), got {cuda_graph_max_bs}")
    config = engine_config or EngineConfig()
    use_graphs = dev.type == "cuda" and not disable_cuda_graph
    overlap = enable_overlap if enable_overlap is not None else (config.enable_overlap or dev.type == "cuda")
    # --- speculative decoding hook: no overlap, the verify step gets the CUDA graphs ---
    spec_k = config.speculative_num_steps if speculative_num_steps is None else speculative_num_steps
    if spec_k:
        if tp > 1:
            raise ValueError("speculative_num_steps > 0 needs tp = 1 (the MTP drafter runs in this process)")
        overlap = bool(enable_overlap)  # off unless asked for (the engine then refuses the combination)
        graph_bs = min(cuda_graph_max_bs, config.max_running_requests) if use_graphs else 0
        config = dataclasses.replace(config, speculative_num_steps=spec_k, speculative_graph_max_bs=graph_bs)
        use_graphs = False  # the runner's q_len-1 decode graphs would never run
    # --- end hook ---
    config = dataclasses.replace(config, enable_overlap=overlap)
    opts = RunnerOptions(
        model_path=path,
        device=dev.type if tp > 1 else str(dev),
        dtype=dtype,
        max_model_len=max_model_len,
        page_size=page_size,
        kv_cache_tokens=kv_cache_tokens,
        gpu_memory_utilization=gpu_memory_utilization,
        cuda_graph_max_bs=min(cuda_graph_max_bs, config.max_running_requests) if use_graphs else 0,
        load_format=load_format,
        random_mtp_layers=1 if spec_k and load_format == "random" else 0,
        kv_cache_dtype=kv_cache_dtype,
    )
    log.info("loading %s on %s in %s%s", path, dev, dtype, f" over {tp} tensor-parallel ranks" if tp > 1 else "")
    tokenizer = load_tokenizer(path)
    if tp > 1:
        from tokenspeed_engine.tp_worker import start_tensor_parallel

        runner: Any = start_tensor_parallel(opts, tp)
    else:
        runner = build_runner(opts, dev)
    log.info("engine: one-step overlap %s, CUDA graphs %s", "on" if overlap else "off",
             "off" if opts.cuda_graph_max_bs == 0 else f"up to batch {opts.cuda_graph_max_bs}")
    engine = Engine(runner, tokenizer, tokenizer.eos_token_ids, config)
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
        tp=args.tp,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        disable_cuda_graph=args.disable_cuda_graph,
        enable_overlap=args.enable_overlap,
        load_format=args.load_format,
        speculative_num_steps=args.speculative_num_steps,
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
    )
    async_engine = AsyncEngine(engine, max_pending_requests=args.max_pending_requests)
    server = OpenAIServer(async_engine, args.served_model_name or name, tokenizer.encode, tokenizer.chat,
                          api_key=api_key, max_body_bytes=args.max_body_bytes)
    return async_engine, server
