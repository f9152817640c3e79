"""DeepSeek-V3 layer fusions for the decode step: the router's fp32-output GEMM, the fused input
projection (q / q_a and kv_a in one GEMM), the shared experts on a second stream."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenspeed_engine.models.configs import build_random_model, moonlight_16b_a3b_config
from tokenspeed_engine.models.deepseek_v3 import DeepseekV3Router, shared_experts_stream


def _router(device: str, gen: torch.Generator) -> DeepseekV3Router:
    cfg = moonlight_16b_a3b_config()
    r = DeepseekV3Router(cfg, torch.bfloat16, device)
    r.weight.data.copy_((torch.randn(r.weight.shape, generator=gen) * 0.02).to(torch.bfloat16))
    return r


def test_cpu_router_is_the_fp32_linear(gen: torch.Generator) -> None:
    r = _router("cpu", gen)
    x = torch.randn(5, r.weight.shape[1], generator=gen).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), r.weight.float())
    assert torch.equal(r(x), want)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 64, 300])
def test_gpu_router_matches_the_fp32_linear(tokens: int, gen: torch.Generator) -> None:
    """Within fp32 summation-order noise of the fp64 product, and the same top-6 experts."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    r = _router("cuda", gen)
    x = torch.randn(tokens, r.weight.shape[1], generator=gen).to(torch.bfloat16).cuda()
    got = r(x)
    assert got.dtype == torch.float32 and got.shape == (tokens, r.weight.shape[0])
    exact = x.double() @ r.weight.double().t()
    err = (got.double() - exact).abs().max().item()
    bound = 1e-5 * (x.double().abs() @ r.weight.double().abs().t()).max().item()
    assert err <= bound, f"worst |logit - fp64| {err:.3e} > {bound:.3e}"
    fp32 = torch.nn.functional.linear(x.float(), r.weight.float())
    same = (got.topk(6).indices.sort().values == fp32.topk(6).indices.sort().values).all(dim=-1)
    assert same.float().mean().item() >= 0.99, f"top-6 differs on {int((~same).sum())} of {tokens} tokens"


TINY = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2, vocab_size=300)


@pytest.mark.parametrize("q_lora_rank", [None, 96])
def test_fused_input_projection_equals_the_two_layers(q_lora_rank: int | None, gen: torch.Generator) -> None:
    """The layers' weights are views of the fused one (so loaders fill it), and its one GEMM gives
    what the two layers give; a module whose weights were replaced falls back to two GEMMs."""
    cfg = dataclasses.replace(moonlight_16b_a3b_config(), **TINY, q_lora_rank=q_lora_rank)
    model = build_random_model(cfg, dtype=torch.float32, device="cpu", seed=3)
    attn = model.model.layers[0].self_attn
    first = attn.q_proj if q_lora_rank is None else attn.q_a_proj
    assert first.weight.data_ptr() == attn.fused_in_proj.data_ptr()
    assert torch.equal(attn.fused_in_proj[: first.weight.shape[0]], first.weight)
    assert torch.equal(attn.fused_in_proj[first.weight.shape[0] :], attn.kv_a_proj_with_mqa.weight)
    x = torch.randn(7, cfg.hidden_size, generator=gen)
    q, latent = attn._project_input(x)
    torch.testing.assert_close(q, first(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(latent, attn.kv_a_proj_with_mqa(x), rtol=1e-6, atol=1e-6)
    attn.kv_a_proj_with_mqa.weight = torch.nn.Parameter(attn.kv_a_proj_with_mqa.weight.clone() * 2)
    q2, latent2 = attn._project_input(x)  # no longer a view of the fused weight: two GEMMs
    torch.testing.assert_close(latent2, attn.kv_a_proj_with_mqa(x))
    torch.testing.assert_close(q2, q)


def test_no_second_stream_on_the_cpu_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shared_experts_stream(torch.zeros(4, 8)) is None
    if torch.cuda.is_available():
        x = torch.zeros(4, 8, device="cuda")
        assert shared_experts_stream(x) is not None
        assert shared_experts_stream(torch.zeros(4096, 8, device="cuda")) is None  # prefill-sized
        monkeypatch.setenv("TOKENSPEED_SHARED_EXPERTS_STREAM", "0")
        assert shared_experts_stream(x) is None


@pytest.mark.gpu
def test_gpu_moe_layer_with_the_second_stream_equals_one_stream(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bitwise: the same kernels, only the order of launch between two streams differs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = dataclasses.replace(moonlight_16b_a3b_config(), **TINY)
    model = build_random_model(cfg, dtype=torch.bfloat16, device="cuda", seed=4)
    moe = model.model.layers[1].mlp
    x = torch.randn(3, cfg.hidden_size, generator=gen).to(torch.bfloat16).cuda()
    with torch.inference_mode():
        two = moe(x)
        monkeypatch.setenv("TOKENSPEED_SHARED_EXPERTS_STREAM", "0")
        one = moe(x)
    assert torch.equal(two, one)
