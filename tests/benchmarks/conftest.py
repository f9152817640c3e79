"""A tiny random DeepSeek-V3 checkpoint (with its word-level tokenizer), written once per session."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.serving.make_random_model import make_random_model
from tokenspeed_engine.models.configs import moonlight_16b_a3b_config


def tiny_config():
    """Moonlight's structure (dense first layer, shared + routed experts, no q LoRA) at toy sizes."""
    return dataclasses.replace(
        moonlight_16b_a3b_config(), num_hidden_layers=3, vocab_size=500, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=1024,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_deepseek")
    make_random_model(path, tiny_config(), torch.float32, "cpu", seed=3)
    return str(path)
