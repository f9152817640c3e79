"""Offline API: ``LLM(model).generate(prompts, SamplingParams)`` without a server."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from tokenspeed_engine.engine import Engine
from tokenspeed_engine.launch import build_engine
from tokenspeed_engine.sampling import SamplingParams


@dataclass
class Completion:
    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cached_tokens: int
    spec_verify_steps: int = 0  # speculative decoding (speculative_num_steps > 0): verify forwards
    spec_accepted_tokens: int = 0  # and the draft tokens they accepted


class LLM:
    """Load a model once; ``generate`` batches every prompt through the continuous-batching engine.

    ``engine_kwargs`` go to :func:`~tokenspeed_engine.launch.build_engine`, e.g.
    ``speculative_num_steps=3`` for MTP speculative decoding.
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.engine: Engine
        self.engine, self.tokenizer, self.model_name = build_engine(model, **engine_kwargs)
        self._ids = itertools.count(1)

    def generate(
        self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        """Complete each prompt (text, or token ids); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return self._run([(p, p if not isinstance(p, str) else self.tokenizer.encode(p)) for p in prompts], params)

    def chat(self, conversations: list[list[dict]], params: SamplingParams | None = None) -> list[Completion]:
        """Apply the model's chat template to each conversation, then generate."""
        return self._run([(c, self.tokenizer.chat(c)) for c in conversations], params)

    def _run(self, items: list[tuple[Any, list[int]]], params: SamplingParams | None) -> list[Completion]:
        params = params or SamplingParams()
        order: dict[int, int] = {}
        for i, (_, ids) in enumerate(items):
            rid = next(self._ids)
            order[rid] = i
            self.engine.add_request(rid, ids, SamplingParams(**vars(params)))
        texts = {rid: "" for rid in order}
        tokens: dict[int, list[int]] = {rid: [] for rid in order}
        results: dict[int, Completion] = {}
        while len(results) < len(order):
            for out in self.engine.step():
                texts[out.request_id] += out.text
                tokens[out.request_id] += out.token_ids
                if out.finished:
                    prompt = items[order[out.request_id]][0]
                    results[out.request_id] = Completion(
                        prompt, texts[out.request_id], tokens[out.request_id], out.finish_reason, out.cached_tokens,
                        out.spec_verify_steps, out.spec_accepted_tokens,
                    )
        return [results[rid] for rid in sorted(order, key=order.get)]
