"""The engine core: the C++ scheduler plans, a model runner computes, the sampler picks.

One ``step()`` = plan -> forward -> sample -> detokenise -> advance. The model sits
behind ``ModelRunner`` (tokenspeed_engine.model_runner), which turns a plan into the
model's batch; the engine never touches tensors beyond the logits it samples from.
Thread-safety: ``add_request`` and ``abort`` may be called from any thread; ``step``
from one thread only (the serving loop).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from tokenspeed_engine.detokenize import IncrementalDetokenizer
from tokenspeed_engine.sampling import Sampler, SamplingParams
from tokenspeed_engine.scheduler import Plan, Scheduler, SchedulerConfig


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ModelRunner(Protocol):
    """Computes next-token logits for the requests a plan samples."""

    vocab_size: int
    num_pages: int  # KV pages the runner allocated, including the null page 0
    page_size: int
    max_model_len: int

    def forward(self, plan: Plan, block_table: np.ndarray) -> torch.Tensor:
        """logits [number of plan entries with sample=1, vocab], in plan order."""
        ...


@dataclass
class EngineConfig:
    max_num_batched_tokens: int = 2048  # tokens per step (decodes + prefill chunk)
    max_running_requests: int = 64
    enable_prefix_cache: bool = True


@dataclass
class RequestOutput:
    request_id: int
    token_ids: list[int]  # generated this step
    text: str  # text released this step
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Request:
    params: SamplingParams
    prompt_len: int
    detok: IncrementalDetokenizer
    cached_tokens: int = 0
    scheduled: bool = False
    generated: list[int] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        eos_token_ids: set[int],
        config: EngineConfig | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_pages=runner.num_pages,
                page_size=runner.page_size,
                max_num_batched_tokens=self.config.max_num_batched_tokens,
                max_running_requests=self.config.max_running_requests,
                enable_prefix_cache=self.config.enable_prefix_cache,
                max_context_len=runner.max_model_len,
            )
        )
        self.sampler = Sampler()
        self._requests: dict[int, _Request] = {}
        self._lock = threading.Lock()
        self._pending_aborts: set[int] = set()
        self._new: list[tuple[int, list[int], SamplingParams]] = []
        self.last_stats = self.scheduler.stats()  # read by other threads (metrics) without touching the scheduler

    # ---- any thread -------------------------------------------------------------
    def add_request(self, request_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError for a prompt or params the model cannot serve."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        limit = self.runner.max_model_len - len(prompt_ids)
        if limit < 1:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.runner.max_model_len}"
            )
        params.validate(self.runner.vocab_size, limit)
        if any(not 0 <= t < self.runner.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
        with self._lock:
            self._new.append((request_id, list(prompt_ids), params))

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._pending_aborts.add(request_id)

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._requests) + len(self._new)

    # ---- the serving thread -----------------------------------------------------
    def _admit(self) -> list[RequestOutput]:
        with self._lock:
            new, self._new = self._new, []
            aborts, self._pending_aborts = self._pending_aborts, set()
        outputs = []
        for rid, prompt, params in new:
            if rid in aborts:
                aborts.discard(rid)
                outputs.append(RequestOutput(rid, [], "", True, "abort", len(prompt)))
                continue
            self.scheduler.submit(rid, prompt, params.max_tokens)
            detok = IncrementalDetokenizer(self.tokenizer.decode, params.stop)
            self._requests[rid] = _Request(params, len(prompt), detok)
        for rid in aborts:
            if rid in self._requests and self.scheduler.abort(rid):
                outputs.append(self._finish(rid, "abort", []))
        return outputs

    def _finish(self, rid: int, reason: str, new_tokens: list[int], text: str = "") -> RequestOutput:
        req = self._requests.pop(rid)
        self.sampler.forget(rid)
        return RequestOutput(
            rid, new_tokens, text, True, reason, req.prompt_len, req.cached_tokens, len(req.generated)
        )

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of every request that progressed."""
        outputs = self._step()
        self.last_stats = self.scheduler.stats()
        return outputs

    def _step(self) -> list[RequestOutput]:
        outputs = self._admit()
        if not self._requests:
            return outputs
        plan = self.scheduler.next_plan()
        if plan.num_requests == 0:
            return outputs
        ids = np.asarray(plan.request_ids)
        sample = np.asarray(plan.sample, dtype=bool)
        for rid, prefix in zip(ids, np.asarray(plan.prefix_lens), strict=True):
            req = self._requests[int(rid)]
            if not req.scheduled:  # the prefix of a request's first step came from the prefix cache
                req.scheduled = True
                req.cached_tokens = int(prefix)
        logits = self.runner.forward(plan, self.scheduler.block_table)
        sampled_ids = [int(r) for r in ids[sample]]
        tokens = self.sampler.sample(logits, sampled_ids, [self._requests[r].params for r in sampled_ids])
        events: dict[int, list[int]] = {}
        texts: dict[int, str] = {}
        stopped: set[int] = set()
        for rid, tok in zip(sampled_ids, tokens, strict=True):
            req = self._requests[rid]
            req.generated.append(tok)
            events[rid] = [tok]
            stop_ids = req.params.stop_token_ids
            eos = (tok in self.eos_token_ids and not req.params.ignore_eos) or tok in stop_ids
            at_length = len(req.generated) >= req.params.max_tokens
            texts[rid] = req.detok.push([] if eos else [tok], final=eos or at_length)
            if eos or req.detok.stopped:
                stopped.add(rid)
        done = dict(self.scheduler.advance(events, finished=list(stopped)))
        for rid in sampled_ids:
            if rid in done:
                continue
            req = self._requests[rid]
            outputs.append(
                RequestOutput(rid, events[rid], texts[rid], prompt_tokens=req.prompt_len, completion_tokens=len(req.generated))
            )
        for rid, reason in done.items():
            if rid in self._requests:
                outputs.append(self._finish(rid, "stop" if rid in stopped else reason, events.get(rid, []), texts.get(rid, "")))
        return outputs
