"""Clear errors: a missing tensor, a shape mismatch, an unexpected tensor, an unknown architecture."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenspeed_engine.loader.source import ShapeMismatchError
from tokenspeed_engine.loader.weights import MissingTensorError, UnexpectedTensorError
from tokenspeed_engine.models import UnknownArchitectureError, load_model


def _rewrite(src, dst, edit):
    """Copy a checkpoint into one safetensors file after ``edit(tensors)``."""
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _load(path, **kw):
    return load_model(path, dtype=torch.float32, device="cpu", progress=False, **kw)


def test_missing_expert_tensor_is_named(deepseek_ckpt, tmp_path):
    _, path = deepseek_ckpt
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    bad = _rewrite(path, tmp_path, lambda t: t.pop(name))
    with pytest.raises(
        MissingTensorError, match=r"(?s)missing 1 tensor\(s\).*model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"
    ):
        _load(bad)


def test_missing_fused_half_is_named(llama_ckpt, tmp_path):
    _, path = llama_ckpt
    bad = _rewrite(path, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        _load(bad)


def test_missing_mtp_layer_when_required(deepseek_ckpt, tmp_path):
    _, path = deepseek_ckpt
    bad = _rewrite(path, tmp_path, lambda t: None)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    assert len(_load(bad).mtp) == 0  # auto: none in the checkpoint
    n = cfg["num_hidden_layers"]
    with pytest.raises(MissingTensorError, match=rf"model\.layers\.{n}\.eh_proj\.weight"):
        _load(bad, load_mtp=True)


def test_shape_mismatch_names_tensor_and_shapes(deepseek_ckpt, tmp_path):
    _, path = deepseek_ckpt
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    shape = []

    def edit(t):
        shape.extend(t[name].shape)
        t[name] = torch.zeros(shape[0] + 1, shape[1])

    bad = _rewrite(path, tmp_path, edit)
    rows, cols = shape
    with pytest.raises(ShapeMismatchError, match=rf"{name}.*\[{rows + 1}, {cols}\].*expects \[{rows}, {cols}\]"):
        _load(bad)


def test_unexpected_tensor(llama_ckpt, tmp_path):
    _, path = llama_ckpt
    bad = _rewrite(path, tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(UnexpectedTensorError, match=r"q_norm"):
        _load(bad)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(UnknownArchitectureError, match="MixtralForCausalLM.*DeepseekV3ForCausalLM, LlamaForCausalLM"):
        _load(tmp_path)


def test_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(tmp_path)
