"""The engine core: the C++ scheduler plans, a model runner computes, the sampler picks.

One ``step()`` = plan -> forward -> sample -> detokenise -> advance. The model sits
behind ``ModelRunner`` (tokenspeed_engine.model_runner), which turns a plan into the
model's batch; the engine never touches tensors beyond the logits it samples from.
With ``enable_overlap`` a step launches plan t+1 before it reads back and reports the
tokens of plan t (:mod:`tokenspeed_engine.overlap`), so the host's work hides behind the
device's; outputs then trail the launches by one step.
Thread-safety: ``add_request`` and ``abort`` may be called from any thread; ``step``
from one thread only (the serving loop).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from tokenspeed_engine.detokenize import IncrementalDetokenizer
from tokenspeed_engine.overlap import DeviceSampler, Launched, fill_rows, resolve_input_ids
from tokenspeed_engine.sampling import SamplingParams
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
        """logits [number of plan entries with sample=1, vocab], in plan order.

        A runner with ``supports_overlap = True`` also takes ``input_ids=`` (a device tensor of
        the plan's T input ids, the -1 ones resolved) and a ``device`` attribute."""
        ...


@dataclass
class EngineConfig:
    max_num_batched_tokens: int = 2048  # tokens per step (decodes + prefill chunk)
    max_running_requests: int = 64
    enable_prefix_cache: bool = True
    enable_overlap: bool = False  # plan step t+1 while the device runs step t (runner must support it)
    # MTP speculative decoding (tokenspeed_engine.speculative): draft tokens per verify, 0 = off;
    # the verify step's CUDA graphs cover batches up to speculative_graph_max_bs (0 = eager)
    speculative_num_steps: int = 0
    speculative_graph_max_bs: int = 0


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
    spec_verify_steps: int = 0  # speculative decoding: verify forwards that included the request so far
    spec_accepted_tokens: int = 0  # and the draft tokens they accepted


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
        self.overlap = self.config.enable_overlap
        if self.overlap and not getattr(runner, "supports_overlap", False):
            raise ValueError(f"enable_overlap needs a runner that takes device input ids; {type(runner).__name__} does not")
        self.device = torch.device(getattr(runner, "device", "cpu"))
        # --- speculative decoding hook (tokenspeed_engine.speculative) ---
        from tokenspeed_engine.speculative.decoder import SpeculativeDecoder, validate_num_steps

        spec_k = validate_num_steps(self.config.speculative_num_steps)
        if spec_k and self.overlap:
            raise ValueError("speculative_num_steps > 0 runs without overlap: set enable_overlap=False")
        # --- end hook ---
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_pages=runner.num_pages,
                page_size=runner.page_size,
                max_num_batched_tokens=self.config.max_num_batched_tokens,
                max_running_requests=self.config.max_running_requests,
                enable_prefix_cache=self.config.enable_prefix_cache,
                max_context_len=runner.max_model_len + spec_k,  # + the draft slots past the last token
                decode_width=1 + spec_k,
            )
        )
        self.spec = (  # speculative decoding hook
            SpeculativeDecoder(runner, spec_k, self.config.max_running_requests, self.config.speculative_graph_max_bs)
            if spec_k
            else None
        )
        self.sampler = DeviceSampler()
        self._inflight: deque[Launched] = deque()  # overlap: launched plans not yet reported (oldest first)
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
        """Requests not finished, plus a launched step still to report (so loops drain it)."""
        with self._lock:
            return len(self._requests) + len(self._new) + len(self._inflight)

    def close(self) -> None:
        """Release the runner's resources (tensor-parallel workers); the engine is unusable after."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

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
        try:
            if self.spec is not None:  # speculative decoding hook: draft, verify, accept (speculative/decoder.py)
                return outputs + self.spec.step(self)
            return outputs + (self._step_overlap() if self.overlap else self._step_serial())
        except Exception:
            self._abandon_inflight()
            raise

    def _step_serial(self) -> list[RequestOutput]:
        if not self._requests:
            return []
        step = Launched(self.scheduler.next_plan())
        self._inflight.append(step)  # until reported: a failure retires it (_abandon_inflight)
        if step.plan.num_requests == 0:
            self._inflight.pop()
            self.scheduler.advance()  # an empty plan is in flight too
            return []
        sampled_ids = step.sampled_ids = self._note_scheduled(step.plan)
        logits = self.runner.forward(step.plan, self.scheduler.block_table)
        tokens = self.sampler.sample(logits, sampled_ids, [self._requests[r].params for r in sampled_ids])
        self._inflight.pop()
        return self._report(sampled_ids, tokens)

    def _abandon_inflight(self) -> None:
        """A step failed: retire every plan in flight, oldest first, aborting its live requests,
        so the scheduler is not left waiting for reports that will never come."""
        while self._inflight:
            step = self._inflight.popleft()
            live = [int(r) for r in np.asarray(step.plan.request_ids) if int(r) in self._requests]
            self.scheduler.advance(aborted=live)
            for rid in live:
                self._requests.pop(rid)
                self.sampler.forget(rid)

    def _note_scheduled(self, plan: Plan) -> list[int]:
        """Record cache hits of first-scheduled requests; returns the requests the plan samples, in order."""
        ids = np.asarray(plan.request_ids)
        for rid, prefix in zip(ids, np.asarray(plan.prefix_lens), strict=True):
            req = self._requests[int(rid)]
            if not req.scheduled:  # the prefix of a request's first step came from the prefix cache
                req.scheduled = True
                req.cached_tokens = int(prefix)
        return [int(r) for r in ids[np.asarray(plan.sample, dtype=bool)]]

    def _step_overlap(self) -> list[RequestOutput]:
        """Launch the next plan, then report the one before it (all of them when nothing new runs)."""
        launched = False
        if self._requests:
            plan = self.scheduler.next_plan()  # at most one other plan is in flight here
            self._launch(plan, self._inflight[-1] if self._inflight else None)
            launched = True
        outputs: list[RequestOutput] = []
        while len(self._inflight) > (1 if launched else 0):
            done = self._inflight.popleft()
            if done.plan.num_requests == 0:
                self.scheduler.advance()
                continue
            outputs += self._report(done.sampled_ids, done.host_tokens())
        return outputs

    def _launch(self, plan: Plan, prev: Launched | None) -> None:
        step = Launched(plan)
        self._inflight.append(step)
        if plan.num_requests == 0:
            return
        step.sampled_ids = self._note_scheduled(plan)
        rows = fill_rows(plan, prev.sampled_ids if prev is not None else [])
        ids = resolve_input_ids(np.asarray(plan.input_ids, dtype=np.int64), rows, prev.tokens if prev else None, self.device)
        logits = self.runner.forward(plan, self.scheduler.block_table, input_ids=ids)
        params = [self._requests[r].params for r in step.sampled_ids]
        step.tokens = self.sampler.sample_tensor(logits, step.sampled_ids, params)
        step.start_copy()

    def _report(self, sampled_ids: list[int], tokens: list[int]) -> list[RequestOutput]:
        """Detokenise, check stops, and advance the scheduler by one step's tokens.

        Under overlap a request may have finished after the step was launched: its token is
        dropped (the scheduler drops such reports as well)."""
        outputs: list[RequestOutput] = []
        events: dict[int, list[int]] = {}
        texts: dict[int, str] = {}
        stopped: set[int] = set()
        for rid, tok in zip(sampled_ids, tokens, strict=True):
            req = self._requests.get(rid)
            if req is None:
                continue
            req.generated.append(tok)
            events[rid] = [tok]
            stop_ids = req.params.stop_token_ids
            eos = (tok in self.eos_token_ids and not req.params.ignore_eos) or tok in stop_ids
            at_length = len(req.generated) >= req.params.max_tokens
            texts[rid] = req.detok.push([] if eos else [tok], final=eos or at_length)
            if eos or req.detok.stopped:
                stopped.add(rid)
        done = dict(self.scheduler.advance(events, finished=list(stopped)))
        for rid in events:
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
