"""Shared helpers of the model tests: tiny HF configs, a paged-cache driver, HF references."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from tests.engine.tiny_models import TINY_DEEPSEEK_DIMS
from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch

PAGE_SIZE = 4
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


def tiny_deepseek_hf_config(**overrides):
    """The tests' tiny DeepSeek-V3 (``TINY_DEEPSEEK_DIMS``) as a Hugging Face config, with YaRN."""
    from transformers import DeepseekV3Config

    kw = dict(
        TINY_DEEPSEEK_DIMS,
        vocab_size=96,
        num_key_value_heads=4,
        routed_scaling_factor=2.5,
        rope_parameters=dict(YARN),
        max_position_embeddings=128,
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
        num_nextn_predict_layers=0,
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def tiny_llama_hf_config(**overrides):
    """A SmolLM2-like Llama: GQA (4 query / 2 KV heads), tied embeddings."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        attn_implementation="eager",
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_hf(config, seed: int):
    """A random HF model (eval, fp32); DeepSeek routers get a random expert-choice bias."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@dataclass
class Seq:
    tokens: list[int]
    cached: int = 0
    pages: list[int] = field(default_factory=list)


class PagedDriver:
    """Runs our model over sequences, handing out cache pages in random order (page 0 never)."""

    def __init__(self, model, num_pages: int = 64, page_size: int = PAGE_SIZE, seed: int = 0):
        self.model, self.page_size = model, page_size
        self.kv = model.make_kv_cache(num_pages, page_size)
        self.free = list(range(1, num_pages))
        random.Random(seed).shuffle(self.free)

    def _grow(self, seq: Seq, total: int) -> None:
        while len(seq.pages) * self.page_size < total:
            seq.pages.append(self.free.pop())

    @torch.no_grad()
    def run(self, seqs: list[Seq], new: list[list[int]], mode: ForwardMode, all_logits: bool = True, **kw):
        inputs = []
        for s, toks in zip(seqs, new, strict=True):
            self._grow(s, s.cached + len(toks))
            inputs.append(SequenceInput(s.cached, toks, list(s.pages)))
        batch = build_forward_batch(inputs, self.page_size, mode)
        out = self.model(batch, self.kv, return_all_logits=all_logits, **kw)
        for s, toks in zip(seqs, new, strict=True):
            s.tokens += toks
            s.cached += len(toks)
        return out


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """HF prefill logits [n, V], then ``steps`` greedy decode steps with HF's cache: (logits, step logits, tokens)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    out = hf(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    prefill = out.logits[0]
    tok = int(prefill[-1].argmax())
    tokens, steps_logits = [tok], []
    for _ in range(steps):
        out = hf(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        steps_logits.append(out.logits[0, -1])
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
    return prefill, steps_logits, tokens
