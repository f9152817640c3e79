"""DeepSeek fp8 checkpoints: e4m3 weights with 128x128 ``weight_scale_inv``, dequantised or kept fp8 for experts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.utils import PagedDriver, Seq, build_hf, rel_err, tiny_deepseek_hf_config
from tokenspeed_engine.forward_batch import ForwardMode
from tokenspeed_engine.loader.fp8 import dequantize_block_fp8, quantize_block_fp8
from tokenspeed_engine.models import load_model

QUANTISED = re.compile(r"model\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.(\w+\.)*\w+_proj)\.weight$")


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(fp8 checkpoint, the same weights dequantised to fp32) of a model whose experts can stay fp8."""
    config = tiny_deepseek_hf_config(
        hidden_size=128,
        moe_intermediate_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
    )
    src = tmp_path_factory.mktemp("bf16")
    build_hf(config, seed=3).save_pretrained(src)
    weights = load_file(src / "model.safetensors")
    fp8, deq = {}, {}
    for name, w in weights.items():
        if QUANTISED.match(name):
            q, s = quantize_block_fp8(w)
            fp8[name], fp8[name.replace(".weight", ".weight_scale_inv")] = q, s
            deq[name] = dequantize_block_fp8(q, s)
        else:
            fp8[name] = deq[name] = w
    cfg = json.loads((src / "config.json").read_text())
    dirs = []
    for tag, tensors, quant in (("fp8", fp8, True), ("deq", deq, False)):
        d = tmp_path_factory.mktemp(tag)
        save_file(tensors, d / "model.safetensors")
        c = dict(cfg)
        if quant:
            c["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
            }
        (d / "config.json").write_text(json.dumps(c))
        dirs.append(d)
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8.values()) > 10
    return dirs


def _logits(path, **kw):
    model = load_model(path, dtype=torch.float32, device="cpu", progress=False, **kw)
    drv, seqs = PagedDriver(model, seed=1), [Seq([]), Seq([])]
    prefill = drv.run(seqs, [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]], ForwardMode.EXTEND)
    decode = drv.run(seqs, [[2], [7]], ForwardMode.DECODE)
    return model, torch.cat([prefill, decode])


def test_fp8_dequantised_matches_dequantised_checkpoint(fp8_pair):
    fp8_dir, deq_dir = fp8_pair
    model, got = _logits(fp8_dir, fp8_experts=False)
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.float32
    _, ref = _logits(deq_dir)
    assert rel_err(got, ref) < 1e-5


def test_fp8_experts_kept_in_fp8(fp8_pair):
    fp8_dir, deq_dir = fp8_pair
    model, got = _logits(fp8_dir)  # auto: hidden and intermediate are multiples of 128
    experts = model.model.layers[1].mlp.experts
    assert experts.w13.dtype == torch.float8_e4m3fn and experts.w13_scale.shape == (4, 2, 1)
    _, ref = _logits(deq_dir)
    # only the activations' per-token fp8 quantisation inside the experts differs
    assert rel_err(got, ref) < 6e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_fp8_weight_without_scale_is_an_error(fp8_pair, tmp_path):
    fp8_dir, _ = fp8_pair
    tensors = load_file(fp8_dir / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((fp8_dir / "config.json").read_text())
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv"):
        load_model(tmp_path, dtype=torch.float32, device="cpu", progress=False)
