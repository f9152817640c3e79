"""One-step overlap: plan and launch step t+1 while the device still runs step t.

The scheduler may have two plans in flight (``MAX_INFLIGHT_PLANS``). A plan made before the
previous step's tokens are known marks those inputs -1; the engine launches it with input
ids resolved *on the device* from the previous step's sampled-token tensor, and reads each
step's tokens back to the host one step later (a pinned copy plus an event), when it reports
them to the scheduler with ``advance``. The host therefore never waits for the device
between launching two steps: planning, batch building and detokenisation of step t hide
behind the device's work on step t+1.

Consequences the engine handles:
* A request that stops (EOS, stop string) at step t is already in step t+1; that step's
  token for it is dropped (the scheduler drops reports for finished requests too). Its KV
  for the stop token is written, so a follow-up turn hits the whole previous turn.
* Greedy output is the same with and without overlap: each request's tokens depend only on
  its own earlier tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenspeed_engine.forward_batch import to_device
from tokenspeed_engine.sampling import Sampler, SamplingParams, _filter_logits
from tokenspeed_engine.scheduler import Plan


class DeviceSampler(Sampler):
    """The engine's sampler, with a variant that leaves the tokens on the device (no host sync)."""

    def sample_tensor(self, logits: torch.Tensor, request_ids: list[int], params: list[SamplingParams]) -> torch.Tensor:
        """int64 [rows] on logits' device; the same draws as :meth:`Sampler.sample` (same generators)."""
        logits = logits.float()
        out = logits.argmax(dim=-1)
        for i, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
            if p.greedy:
                continue
            probs = _filter_logits(logits[i], p).softmax(-1)
            out[i] = torch.multinomial(probs, 1, generator=self._generator(rid, p, logits.device))[0]
        return out


def fill_rows(plan: Plan, prev_sampled: list[int]) -> np.ndarray:
    """For each input token of ``plan``: the row of the previous step's sampled tokens that
    supplies it (-1 for a known token). Raises RuntimeError for a -1 input whose request the
    previous step did not sample (the scheduler and the engine disagree)."""
    ids = np.asarray(plan.input_ids, dtype=np.int64)
    rows = np.full(ids.shape[0], -1, dtype=np.int64)
    unknown = np.flatnonzero(ids < 0)
    if unknown.size == 0:
        return rows
    extend = np.asarray(plan.extend_lens, dtype=np.int64)
    owner = np.repeat(np.asarray(plan.request_ids, dtype=np.int64), extend)  # request of each token
    where = {rid: r for r, rid in enumerate(prev_sampled)}
    for t in unknown:
        rid = int(owner[t])
        if rid not in where:
            raise RuntimeError(f"step {plan.step}: input {t} of request {rid} is unknown and the previous step did not sample it")
        rows[t] = where[rid]
    return rows


def resolve_input_ids(ids: np.ndarray, rows: np.ndarray, prev_tokens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The plan's input ids on ``device``, -1 entries replaced by ``prev_tokens[rows]`` (no host sync)."""
    known = to_device(np.where(rows >= 0, 0, ids), device)
    if prev_tokens is None or not (rows >= 0).any():
        return known
    take = to_device(np.maximum(rows, 0), device)
    mask = to_device(rows >= 0, device)
    return torch.where(mask, prev_tokens.index_select(0, take), known)


@dataclass
class Launched:
    """A plan handed to the device, and its sampled tokens on their way back to the host."""

    plan: Plan
    sampled_ids: list[int] = field(default_factory=list)  # request of each sampled row
    tokens: torch.Tensor | None = None  # int64 [rows] on the device (the next plan's -1 inputs)
    _host: torch.Tensor | None = None
    _ready: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Begin the device -> host copy of the tokens (non-blocking on CUDA)."""
        if self.tokens is None:
            return
        if self.tokens.is_cuda:
            self._host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self._host.copy_(self.tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = self.tokens

    def host_tokens(self) -> list[int]:
        """The sampled tokens; waits for this step's device work only."""
        if self._host is None:
            return []
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()
