"""A deterministic toy model and byte tokenizer for engine and server tests.

The engine, the C++ scheduler, the sampler, the detokenizer and the HTTP stack under
test are the real ones; only the network is replaced by a rule whose answer is known:
the next token is a function of the previous token and its position, so any lost,
duplicated or misordered token changes the text.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.scheduler import Plan

VOCAB = 256
EOS = 0


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return [b for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i != EOS).decode("utf-8", errors="replace")

    def chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


def next_token(prev: int, pos: int, eos_at: int | None) -> int:
    """Printable lowercase letters; EOS when the position reaches eos_at."""
    if eos_at is not None and pos >= eos_at:
        return EOS
    return 97 + (prev * 7 + pos * 3) % 26


class ToyRunner:
    def __init__(self, num_pages: int = 256, page_size: int = 4, max_model_len: int = 512, eos_at: int | None = None):
        self.vocab_size, self.num_pages, self.page_size, self.max_model_len = VOCAB, num_pages, page_size, max_model_len
        self.eos_at = eos_at
        self.steps = 0

    def forward(self, plan: Plan, block_table: np.ndarray) -> torch.Tensor:
        self.steps += 1
        ids, pos = np.asarray(plan.input_ids), np.asarray(plan.positions)
        rows, start = [], 0
        for n, sample in zip(np.asarray(plan.extend_lens), np.asarray(plan.sample), strict=True):
            last = start + n - 1
            assert ids[last] >= 0, "the engine must fill every input id before the forward"
            if sample:
                logits = torch.full((VOCAB,), -10.0)
                logits[next_token(int(ids[last]), int(pos[last]), self.eos_at)] = 10.0
                rows.append(logits)
            start += n
        return torch.stack(rows) if rows else torch.empty(0, VOCAB)


def expected_text(prompt: list[int], n: int, eos_at: int | None = None) -> str:
    out, prev, pos = [], prompt[-1], len(prompt) - 1
    for _ in range(n):
        tok = next_token(prev, pos, eos_at)
        if tok == EOS:
            break
        out.append(tok)
        prev, pos = tok, pos + 1
    return bytes(out).decode()


def toy_engine(**runner_kwargs) -> Engine:
    return Engine(ToyRunner(**runner_kwargs), ByteTokenizer(), {EOS}, EngineConfig(max_num_batched_tokens=64,
                                                                                   max_running_requests=16))
