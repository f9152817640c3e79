"""Sampling parameters and the token sampler.

Greedy when temperature == 0; otherwise temperature, then top-k, top-p and min-p
filters, then a draw from the remaining distribution. A request with a seed draws
from its own generator, so its output does not depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16


@dataclass
class SamplingParams:
    """What a request asks of generation (OpenAI field names where one exists)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self, vocab_size: int, max_tokens_limit: int) -> None:
        """Raise ValueError naming the first invalid field."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > max_tokens_limit:
            raise ValueError(f"max_tokens ({self.max_tokens}) exceeds the limit of {max_tokens_limit} for this prompt")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}")
        if not 0.0 <= float(self.min_p) <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits of one row with top-k / top-p / min-p applied (-inf outside)."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


class Sampler:
    """Samples one token per row; keeps a generator per seeded request."""

    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    def forget(self, request_id: int) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: int, p: SamplingParams, device: torch.device) -> torch.Generator | None:
        if p.seed is None:
            return None
        g = self._generators.get(request_id)
        if g is None:
            g = torch.Generator(device=device).manual_seed(p.seed)
            self._generators[request_id] = g
        return g

    def sample(self, logits: torch.Tensor, request_ids: list[int], params: list[SamplingParams]) -> list[int]:
        """logits [rows, vocab] (any float dtype) -> one token id per row."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        out = greedy.tolist()
        for i, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
            if p.greedy:
                continue
            probs = _filter_logits(logits[i], p).softmax(-1)
            out[i] = int(torch.multinomial(probs, 1, generator=self._generator(rid, p, logits.device)))
        return out
