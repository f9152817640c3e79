"""Fixtures of the model tests: tiny random HF checkpoints written with ``save_pretrained``."""

from __future__ import annotations

import pytest
import torch

from tests.models.utils import build_hf, tiny_deepseek_hf_config, tiny_llama_hf_config


def _saved(tmp_path_factory, name: str, config, seed: int):
    hf = build_hf(config, seed)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path, max_shard_size="200KB")  # several shards + model.safetensors.index.json
    return hf, path


@pytest.fixture(scope="session", params=["q_lora_none+yarn", "q_lora+default_rope"])
def deepseek_ckpt(request, tmp_path_factory):
    """(HF model, checkpoint dir): Moonlight-like (no q LoRA, YaRN) and DeepSeek-V3-like (q LoRA)."""
    if request.param == "q_lora_none+yarn":
        config = tiny_deepseek_hf_config()
    else:
        config = tiny_deepseek_hf_config(
            q_lora_rank=24,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            n_shared_experts=2,
        )
    return _saved(tmp_path_factory, "deepseek", config, seed=1)


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    return _saved(tmp_path_factory, "llama", tiny_llama_hf_config(), seed=2)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
