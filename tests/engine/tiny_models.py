"""Small random models for engine tests: a DeepSeek-V3 built in memory, and a saved checkpoint with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.model_runner import TorchModelRunner
from tokenspeed_engine.models.configs import DeepseekV3Config, build_random_model

VOCAB = 211  # odd on purpose


# The tiny DeepSeek-V3 of the engine, model and speculative tests: 3 layers (1 dense, 2 MoE),
# 8 experts in 2 groups (group-limited routing), no q LoRA: every path of the real model.
TINY_DEEPSEEK_DIMS = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)


def tiny_deepseek_config(**overrides) -> DeepseekV3Config:
    """``TINY_DEEPSEEK_DIMS`` with an odd vocabulary, as our own config."""
    return DeepseekV3Config(**{**TINY_DEEPSEEK_DIMS, "vocab_size": VOCAB, "max_position_embeddings": 512, **overrides})


def tiny_deepseek(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 1, **overrides):
    # std 0.1: logits far enough apart that greedy choices are not near-ties
    return build_random_model(tiny_deepseek_config(**overrides), dtype=dtype, device=device, seed=seed, std=0.1)


def runner_for(
    model, *, num_pages: int = 257, page_size: int = 4, max_model_len: int = 256, device: str = "cpu", cuda_graph_max_bs: int = 0
) -> TorchModelRunner:
    kv = model.make_kv_cache(num_pages, page_size, device=device)
    return TorchModelRunner(
        model,
        kv,
        num_pages=num_pages,
        page_size=page_size,
        max_model_len=max_model_len,
        vocab_size=model.config.vocab_size,
        device=device,
        cuda_graph_max_bs=cuda_graph_max_bs,
    )


class IdTokenizer:
    """Token ids as text ("5 17 "): lossless, so texts compare as token sequences."""

    def encode(self, text: str) -> list[int]:
        return [int(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{i} " for i in ids)


def engine_for(runner, overlap: bool, batched_tokens: int = 64, running: int = 16, eos: int = 0) -> Engine:
    return Engine(runner, IdTokenizer(), {eos}, EngineConfig(batched_tokens, running, enable_overlap=overlap))


def run_engine_counted(engine: Engine, max_steps: int = 10_000) -> tuple[dict[int, list], int]:
    """Step until every request finished: (request id -> its outputs, steps taken)."""
    outs: dict[int, list] = {}
    for step in range(max_steps):
        if engine.num_unfinished() == 0:
            return outs, step
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("the engine did not finish")


def run_engine(engine: Engine, max_steps: int = 10_000) -> dict[int, list]:
    """Step until every request finished: request id -> its outputs."""
    return run_engine_counted(engine, max_steps)[0]


def save_tiny_checkpoint(path: Path, seed: int = 5) -> Path:
    """An HF DeepSeek-V3 checkpoint (safetensors) plus a word-level tokenizer: loadable by ``LLM`` / ``serve``."""
    from tests.models.utils import build_hf, tiny_deepseek_hf_config
    from tokenspeed_engine.random_checkpoint import write_word_tokenizer

    build_hf(tiny_deepseek_hf_config(vocab_size=VOCAB, max_position_embeddings=512), seed=seed).save_pretrained(path)
    write_word_tokenizer(path, VOCAB)
    return path
