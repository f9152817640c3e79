"""Model configurations (read from HF ``config.json`` dicts), the Moonlight shape, and random models.

``moonlight_16b_a3b_config()`` is the shape of moonshotai/Moonlight-16B-A3B (a DeepSeek-V3
architecture); ``build_random_model`` builds any config with random weights, for device
checks without a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from tokenspeed_engine.layers.rotary import rope_parameters


@dataclass
class DeepseekV3Config:
    """DeepSeek-V3 / Kimi / Moonlight: MLA attention, MoE with shared experts, first-k dense layers."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    attention_bias: bool = False
    hidden_act: str = "silu"
    quantization_config: dict[str, Any] | None = None
    architecture: str = "DeepseekV3ForCausalLM"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> DeepseekV3Config:
        """From a Hugging Face config.json dict (old ``rope_scaling`` or new ``rope_parameters`` style)."""
        names = {f for f in cls.__dataclass_fields__ if f not in ("rope", "architecture")}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        if d.get("q_lora_rank", "absent") is None:
            kw["q_lora_rank"] = None
        kw["num_nextn_predict_layers"] = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {d['hidden_act']!r} (only silu is supported)")
        return cls(**kw, rope=rope_parameters(d))

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict Hugging Face transformers reads (rope as ``rope_parameters``)."""
        d = asdict(self)
        d.pop("architecture")
        d["rope_parameters"] = d.pop("rope")
        d["architectures"] = [self.architecture]
        d["model_type"] = "deepseek_v3"
        d["num_key_value_heads"] = self.num_attention_heads
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        return d


@dataclass
class LlamaConfig:
    """Llama / SmolLM2: GQA attention, SwiGLU MLP, optional tied embeddings."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        names = {f for f in cls.__dataclass_fields__ if f not in ("rope", "architecture")}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {d['hidden_act']!r} (only silu is supported)")
        return cls(**kw, rope=rope_parameters(d))


def moonlight_16b_a3b_config() -> DeepseekV3Config:
    """The shape of moonshotai/Moonlight-16B-A3B (its config.json; no MTP layer is shipped)."""
    return DeepseekV3Config(
        vocab_size=163840,
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        routed_scaling_factor=2.446,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
    )


@torch.no_grad()
def randomize_(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Fill every parameter: norms ~ 1 + N(0, std), fp8 experts from quantised N(0, std), others N(0, std).

    Values are drawn on the parameter's device (fast for multi-GB models on a GPU).
    """
    from tokenspeed_engine.loader.fp8 import quantize_block_fp8

    gen_device = next(model.parameters()).device
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dtype in (torch.float8_e4m3fn,):
            for e in range(p.shape[0]):
                w = torch.randn(p.shape[1:], generator=gen, device=gen_device) * std
                q, s = quantize_block_fp8(w)
                p.data[e].copy_(q)
                getattr(model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1] + "_scale")[e].copy_(s)
            continue
        if name.endswith("_scale"):
            continue  # written with its fp8 weight
        noise = torch.randn(p.shape, generator=gen, device=gen_device, dtype=torch.float32) * std
        if "norm" in name.rsplit(".", 2)[-2]:
            noise += 1.0
        p.data.copy_(noise.to(p.dtype))
    return model


def build_random_model(
    config: DeepseekV3Config | LlamaConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    seed: int = 0,
    parallel: Any = None,
    std: float = 0.02,
    fp8_experts: bool = False,
) -> nn.Module:
    """A model of ``config`` with random weights (and random e_score_correction_bias), ready to run.

    Every rank of a parallel run draws the same numbers for its (equally shaped) shard, so
    replicated parameters agree across ranks. ``fp8_experts``: DeepSeek experts in e4m3 with
    block scales (hidden and moe_intermediate_size / moe_tp multiples of 128).
    """
    from tokenspeed_engine.models import build_model

    kw = {"fp8_experts": fp8_experts} if fp8_experts else {}
    with torch.device(device):
        model = build_model(config, dtype=dtype, device=device, parallel=parallel, **kw)
    return randomize_(model, seed, std)
