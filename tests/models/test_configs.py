"""Config parsing, the Moonlight-16B-A3B shape, random models and the HF reference built from them."""

from __future__ import annotations

import dataclasses

import torch

from tests.models.utils import PagedDriver, Seq, rel_err
from tokenspeed_engine.forward_batch import ForwardMode
from tokenspeed_engine.models import config_from_hf
from tokenspeed_engine.models.configs import DeepseekV3Config, build_random_model, moonlight_16b_a3b_config
from tokenspeed_engine.models.hf_export import hf_reference_logits


def test_moonlight_shape():
    c = moonlight_16b_a3b_config()
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (27, 2048, 163840)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.moe_intermediate_size) == (64, 6, 2, 1408)
    assert (c.first_k_dense_replace, c.intermediate_size, c.n_group, c.topk_group) == (1, 11264, 1, 1)
    assert (c.kv_lora_rank, c.q_lora_rank, c.num_attention_heads) == (512, None, 16)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert (c.routed_scaling_factor, c.scoring_func, c.rope["rope_theta"]) == (2.446, "sigmoid", 50000.0)
    assert config_from_hf(c.to_hf()) == c


def test_old_style_rope_scaling_is_read():
    d = moonlight_16b_a3b_config().to_hf()
    del d["rope_parameters"]
    d["rope_theta"] = 10000.0
    d["rope_scaling"] = {
        "type": "yarn",
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    c = DeepseekV3Config.from_hf(d)
    assert c.rope["rope_type"] == "yarn" and c.rope["rope_theta"] == 10000.0 and c.rope["factor"] == 40


def test_random_moonlight_like_model_matches_hf_reference():
    """A scaled-down Moonlight (same structure) with random weights equals HF's modules on the same weights."""
    c = dataclasses.replace(
        moonlight_16b_a3b_config(),
        vocab_size=80,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=3,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    )
    model = build_random_model(c, dtype=torch.float32, device="cpu", seed=0, std=0.1)
    drv, seq = PagedDriver(model, seed=1), Seq([])
    prompt = [3, 14, 15, 9, 26, 53, 5]
    with torch.no_grad():
        logits = [drv.run([seq], [prompt], ForwardMode.EXTEND)[-1]]
        for _ in range(3):
            logits.append(drv.run([seq], [[int(logits[-1].argmax())]], ForwardMode.DECODE)[0])
        ref = hf_reference_logits(model, seq.tokens)[len(prompt) - 1 :]
    assert rel_err(torch.stack(logits), ref) < 1e-4
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0  # routing bias is random too


def test_random_model_with_fp8_experts():
    c = dataclasses.replace(
        moonlight_16b_a3b_config(),
        vocab_size=80,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    )
    model = build_random_model(c, dtype=torch.float32, device="cpu", seed=0, std=0.1, fp8_experts=True)
    experts = model.model.layers[1].mlp.experts
    assert experts.w13.dtype == torch.float8_e4m3fn and float(experts.w13_scale.min()) > 0
    drv, seq = PagedDriver(model, seed=1), Seq([])
    with torch.no_grad():
        got = drv.run([seq], [[1, 2, 3, 4, 5]], ForwardMode.EXTEND)
        ref = hf_reference_logits(model, seq.tokens)  # experts dequantised, activations unquantised
    assert rel_err(got, ref) < 6e-2
