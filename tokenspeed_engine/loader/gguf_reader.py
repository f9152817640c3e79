"""GGUF checkpoints of Llama models (llama.cpp's format), read through the ``gguf`` package.

Tensors are renamed to Hugging Face names and dequantised to fp32 on read (F32, F16, BF16,
Q8_0, Q4_0, Q4_K, ... whatever ``gguf.quants.dequantize`` knows). llama.cpp's converter
permutes the rows of q_proj / k_proj so rotary pairs are adjacent (GGML's "normal" RoPE);
reading undoes that permutation, giving back HF's half-split layout.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch

from tokenspeed_engine.loader.source import TensorSource

_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor name (None for tensors without an HF counterpart)."""
    m = re.match(r"blk\.(\d+)\.(\w+)\.(weight|bias)$", gguf_name)
    if m and m[2] in _LAYER:
        return f"model.layers.{m[1]}.{_LAYER[m[2]]}.{m[3]}"
    m = re.match(r"(\w+)\.(weight|bias)$", gguf_name)
    if m and m[1] in _GLOBAL:
        return f"{_GLOBAL[m[1]]}.{m[2]}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: rows (head, pair, 2) -> (head, 2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's ``permute`` (what its HF -> GGUF converter applies to q_proj / k_proj)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A GGUF file seen as an HF checkpoint: ``config`` (HF config.json dict), ``names()``, ``has()``, ``get()``."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self._gguf = gguf
        self.path = str(path)
        self.reader = gguf.GGUFReader(self.path)
        self.meta = {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"unknown GGUF architecture {arch!r} in {self.path} (supported: 'llama')")
        self._tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
            elif t.name == "rope_freqs.weight":
                raise NotImplementedError(f"{self.path}: GGUF rope_freqs (Llama-3 frequency factors) is not supported")
        self.config = self._config()

    def _config(self) -> dict[str, Any]:
        m = self.meta
        heads = int(m["llama.attention.head_count"])
        hidden = int(m["llama.embedding_length"])
        embed = self._tensors["model.embed_tokens.weight"]
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": int(m.get("llama.vocab_size", int(embed.shape[-1]))),
            "hidden_size": hidden,
            "intermediate_size": int(m["llama.feed_forward_length"]),
            "num_hidden_layers": int(m["llama.block_count"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(m.get("llama.attention.head_count_kv", heads)),
            "head_dim": int(m.get("llama.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(m.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(m.get("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(m.get("llama.context_length", 4096)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        scaling = m.get("llama.rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise NotImplementedError(f"{self.path}: GGUF rope scaling {scaling!r} is not supported")
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(m["llama.rope.scaling.factor"])}
        return cfg

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> TensorSource:
        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        heads = None
        if name.endswith("self_attn.q_proj.weight"):
            heads = self.config["num_attention_heads"]
        elif name.endswith("self_attn.k_proj.weight"):
            heads = self.config["num_key_value_heads"]
        cache: dict[str, torch.Tensor] = {}

        def read(idx: tuple[slice, ...]) -> torch.Tensor:
            if "w" not in cache:
                data = self._gguf.quants.dequantize(t.data, t.tensor_type)
                w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a writable copy
                cache["w"] = unpermute_rope_rows(w, heads) if heads else w
            return cache["w"][idx]

        return TensorSource(name, shape, torch.float32, read)
