"""GGUF Llama: a tiny model written with the ``gguf`` package's writer (as llama.cpp's converter
lays it out, q/k rows permuted) loads to the same logits as its safetensors checkpoint."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.utils import PagedDriver, Seq, rel_err
from tokenspeed_engine.forward_batch import ForwardMode
from tokenspeed_engine.loader.gguf_reader import permute_rope_rows
from tokenspeed_engine.models import load_model

Q = gguf.GGMLQuantizationType
NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{NAMES[rest.rsplit('.', 1)[0]]}.weight"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf]


def write_gguf(path, weights: dict[str, torch.Tensor], config: dict, qtype: Q, arch: str = "llama") -> None:
    """Write like convert_hf_to_gguf.py: q/k rows permuted, 1-D tensors in F32, matrices in ``qtype``."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    for name, t in weights.items():
        if name.endswith("q_proj.weight"):
            t = permute_rope_rows(t, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            t = permute_rope_rows(t, config["num_key_value_heads"])
        a = t.float().numpy()
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), a)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(path) -> torch.Tensor:
    model = load_model(path, dtype=torch.float32, device="cpu", progress=False)
    drv, seqs = PagedDriver(model, seed=1), [Seq([]), Seq([])]
    out = drv.run(seqs, [[5, 3, 8, 1, 9, 4], [2, 7, 7]], ForwardMode.EXTEND)
    return torch.cat([out, drv.run(seqs, [[11], [12]], ForwardMode.DECODE)])


@pytest.fixture(scope="module")
def llama_weights(llama_ckpt):
    _, path = llama_ckpt
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f))
    return path, weights, json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("qtype,tol", [(Q.F32, 1e-5), (Q.F16, 5e-3), (Q.Q8_0, 3e-2), (Q.Q4_0, 0.5)])
def test_gguf_matches_safetensors(llama_weights, tmp_path, qtype, tol):
    path, weights, config = llama_weights
    write_gguf(tmp_path / "model.gguf", weights, config, qtype)
    got = _logits(tmp_path / "model.gguf")
    assert rel_err(got, _logits(path)) < tol
    if qtype not in (Q.F32, Q.F16):
        # exactly the safetensors model with gguf's own dequantised weights: the loader adds no error
        deq = {}
        for name, t in weights.items():
            a = t.float().numpy()
            if a.ndim == 2:
                a = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
            deq[name] = torch.from_numpy(np.ascontiguousarray(a))
        ref_dir = tmp_path / "deq"
        ref_dir.mkdir()
        save_file(deq, ref_dir / "model.safetensors")
        (ref_dir / "config.json").write_text(json.dumps(config))
        assert rel_err(got, _logits(ref_dir)) < 1e-5


def test_gguf_unknown_architecture(llama_weights, tmp_path):
    _, weights, config = llama_weights
    write_gguf(tmp_path / "m.gguf", weights, config, Q.F32, arch="falcon")
    with pytest.raises(ValueError, match="unknown GGUF architecture 'falcon'"):
        load_model(tmp_path / "m.gguf", dtype=torch.float32, device="cpu", progress=False)
