"""One engine step with MTP speculative decoding: draft, verify, accept, roll back, report.

The scheduler runs with ``decode_width = k + 1``: each decoding request gets KV positions
``P .. P+k`` (its last token at P, then k draft slots). A step then does, for the decodes:

1. **Draft.** Draft 1 was made at the end of the request's previous step (the MTP pass
   over the tokens that step verified, or over its prompt); drafts 2..k run the MTP layer
   recursively at positions ``P .. P+k-2`` (:func:`~tokenspeed_engine.models.deepseek_mtp.draft_tokens`).
2. **Verify.** One target forward over ``[t_P, d_1 .. d_k]`` per request (DECODE, q_len k+1:
   ``mla_decode`` with the queries folded into the head axis, causal bottom-right).
3. **Accept** (:mod:`~tokenspeed_engine.speculative.acceptance`): greedy longest matching
   prefix + bonus token, or rejection sampling; each request emits n+1 tokens.
4. **MTP pass** over the verified positions ``P .. P+k`` with the target's hidden states and
   the tokens that follow them (correct up to row n; rows after it are rewritten later),
   which rewrites the MTP KV the drafts left there and yields the next step's draft 1 from
   row n.
5. **Report** n+1 tokens to the scheduler (``advance``): it rewinds the request's KV extent
   by the k - n rejected slots, so the next step overwrites them; the pages stay with the
   request (they are reused next step) and return to the pool when it finishes, so no page
   leaks (tests/speculative/test_kv_rollback.py fuzzes this).

Prefill chunks run as usual (EXTEND) and also run the MTP layer over the chunk (row j:
target hidden j with token j+1), so the MTP cache covers the prompt; the chunk that
finishes the prompt samples the first token and makes draft 1.

No overlap: a request with a speculative step in flight cannot be planned again (its
accepted length is unknown), so the step is synchronous.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch, to_device
from tokenspeed_engine.models.deepseek_mtp import draft_tokens, require_mtp
from tokenspeed_engine.sampling import SamplingParams
from tokenspeed_engine.speculative.acceptance import greedy_verify, rejection_verify, sample_from_probs, target_probs
from tokenspeed_engine.speculative.batches import decode_batch
from tokenspeed_engine.speculative.report import report_tokens
from tokenspeed_engine.speculative.stats import RequestSpecStats, SpecStats

MAX_NUM_STEPS = 7  # mla_decode folds at most 8 query tokens (k + 1) into the head axis


def validate_num_steps(num_steps: Any) -> int:
    """``num_steps`` as an int in 0..MAX_NUM_STEPS (0: off); ValueError naming the argument otherwise."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 0 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"speculative_num_steps must be an integer in 0..{MAX_NUM_STEPS}, got {num_steps!r}")
    return num_steps


class SpeculativeDecoder:
    """Speculative decoding with the model's MTP layer over a TorchModelRunner's model and KV cache.

    Per-request draft state (draft 1 and the MTP hidden state that made it) lives in device
    buffers indexed by the request's scheduler slot, which it keeps while resident.
    """

    def __init__(self, runner: Any, num_steps: int, max_running_requests: int, graph_max_bs: int = 0) -> None:
        self.k = validate_num_steps(num_steps)
        if self.k == 0:
            raise ValueError("SpeculativeDecoder needs speculative_num_steps >= 1")
        for attr in ("model", "kv_cache", "page_size", "device"):
            if not hasattr(runner, attr):
                raise ValueError(
                    f"speculative decoding needs a runner holding the model and its KV cache "
                    f"(in-process, one rank); {type(runner).__name__} has no {attr!r}"
                )
        require_mtp(runner.model)
        self.model, self.kv_cache = runner.model, runner.kv_cache
        self.page_size, self.device = runner.page_size, torch.device(runner.device)
        self.vocab_size = self.model.config.vocab_size
        hidden = self.model.config.hidden_size
        self._first = torch.zeros(max_running_requests, dtype=torch.int64, device=self.device)
        self._hidden = torch.zeros(max_running_requests, hidden, dtype=self.model.dtype, device=self.device)
        self._first_probs: dict[int, torch.Tensor] = {}  # sampling requests: q of draft 1
        self._slot_of: dict[int, int] = {}  # request -> slot its draft state was written to
        self.stats = SpecStats(self.k)
        self.request_stats: dict[int, RequestSpecStats] = {}
        self.graphs = None
        if graph_max_bs > 0:
            from tokenspeed_engine.speculative.graphs import SpecGraphs

            self.graphs = SpecGraphs.create(self, graph_max_bs, runner.max_model_len)

    # ---- the engine step ------------------------------------------------------------
    def step(self, engine: Any) -> list[Any]:
        """Plan, run and report one step of ``engine`` (its requests were admitted already)."""
        self._forget_finished(engine)  # aborted since the last step
        if not engine._requests:
            return []
        sched = engine.scheduler
        plan = sched.next_plan()
        inflight = getattr(engine, "_inflight", None)
        if inflight is not None:  # so a failure retires the plan (Engine._abandon_inflight)
            from tokenspeed_engine.overlap import Launched

            inflight.append(Launched(plan))
        if plan.num_requests == 0:
            if inflight is not None:
                inflight.pop()
            sched.advance()
            return []
        rids = np.asarray(plan.request_ids, dtype=np.int64)
        prefix = np.asarray(plan.prefix_lens, dtype=np.int64)
        extend = np.asarray(plan.extend_lens, dtype=np.int64)
        ids = np.asarray(plan.input_ids, dtype=np.int64)
        slots = np.asarray(plan.slots, dtype=np.int64)
        starts = np.zeros(len(rids) + 1, dtype=np.int64)
        np.cumsum(extend, out=starts[1:])
        width = int(-(-(prefix + extend).max() // self.page_size))
        pages = np.asarray(sched.block_table)[slots, :width].astype(np.int32)  # a copy: the view changes
        for rid, p in zip(rids, prefix, strict=True):
            req = engine._requests[int(rid)]
            if not req.scheduled:  # the prefix of a request's first step came from the prefix cache
                req.scheduled, req.cached_tokens = True, int(p)
        # a decode entry: k+1 positions whose k draft inputs are unknown (-1); chunks carry known tokens
        is_decode = np.array(
            [extend[i] == self.k + 1 and (ids[starts[i] + 1 : starts[i + 1]] < 0).all() for i in range(len(rids))]
        )
        if (ids[starts[:-1][is_decode]] < 0).any() or (ids[~np.repeat(is_decode, extend)] < 0).any():
            raise RuntimeError(f"step {plan.step}: an input token is unknown (speculative decoding runs without overlap)")
        emitted: dict[int, list[int]] = {}
        with torch.inference_mode():
            dec = np.flatnonzero(is_decode)
            if dec.size:
                emitted.update(self._decode(engine, rids[dec], slots[dec], prefix[dec], ids[starts[dec]], pages[dec]))
            chunk = np.flatnonzero(~is_decode)
            if chunk.size:
                plan_sample = np.asarray(plan.sample, dtype=bool)
                emitted.update(self._extend(engine, chunk, rids, slots, prefix, extend, ids, starts, pages, plan_sample))
        if inflight is not None:
            inflight.pop()
        order = [int(r) for r in rids if int(r) in emitted]  # plan order
        outputs = report_tokens(engine, [(r, emitted[r]) for r in order], self.request_stats)
        self._forget_finished(engine)
        return outputs

    def _forget_finished(self, engine: Any) -> None:
        for rid in [r for r in self._slot_of if r not in engine._requests]:
            self._slot_of.pop(rid, None)
            self._first_probs.pop(rid, None)
            self.request_stats.pop(rid, None)

    # ---- drafting helpers -----------------------------------------------------------
    def _chooser(self, engine: Any, rids: list[int], params: list[SamplingParams]):
        """Draft choice per row: argmax for greedy requests, a draw from the filtered MTP
        distribution q (returned, for the acceptance test) for the others."""
        sampled = [i for i, p in enumerate(params) if not p.greedy]

        def choose(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            tokens = logits.argmax(-1)
            if not sampled:
                return tokens, None
            q = torch.cat([target_probs(logits[i : i + 1], params[i]) for i in sampled])
            u = torch.stack([self._uniforms(engine, rids[i], params[i], 1)[0] for i in sampled])
            tokens[torch.tensor(sampled, device=tokens.device)] = sample_from_probs(q, u)
            return tokens, q

        return choose, sampled

    def _uniforms(self, engine: Any, rid: int, params: SamplingParams, n: int) -> torch.Tensor:
        gen = engine.sampler._generator(rid, params, self.device)  # the request's own stream when seeded
        return torch.rand(n, generator=gen, device=self.device)

    def _check_state(self, rids: np.ndarray, slots: np.ndarray) -> None:
        for rid, slot in zip(rids.tolist(), slots.tolist(), strict=True):
            if self._slot_of.get(rid) != slot:
                raise RuntimeError(f"request {rid}: no draft state at slot {slot} (have {self._slot_of.get(rid)})")

    def _store(
        self,
        rids: list[int],
        slots: np.ndarray,
        first: torch.Tensor,
        hidden: torch.Tensor,
        q: torch.Tensor | None,
        sampled: list[int],
    ) -> None:
        slot_t = to_device(slots, self.device)
        self._first.index_copy_(0, slot_t, first)
        self._hidden.index_copy_(0, slot_t, hidden.to(self._hidden.dtype))
        for rid, slot in zip(rids, slots.tolist(), strict=True):
            self._slot_of[rid] = slot
            self._first_probs.pop(rid, None)
        for j, i in enumerate(sampled):
            self._first_probs[rids[i]] = q[j]

    # ---- decodes: draft, verify, accept, MTP pass ----------------------------------------
    def _decode(
        self, engine: Any, rids: np.ndarray, slots: np.ndarray, start: np.ndarray, last: np.ndarray, pages: np.ndarray
    ) -> dict[int, list[int]]:
        k, bsz = self.k, len(rids)
        self._check_state(rids, slots)
        rid_list = rids.tolist()
        params = [engine._requests[r].params for r in rid_list]
        choose, sampled = self._chooser(engine, rid_list, params)
        slot_t = to_device(slots, self.device)
        first = self._first.index_select(0, slot_t)
        hidden = self._hidden.index_select(0, slot_t)
        graphs = self.graphs if self.graphs is not None and self.graphs.fits(bsz) else None
        mtp_step = graphs.mtp_step if graphs is not None else None
        drafts, probs = draft_tokens(self.model, self.kv_cache, first, hidden, start, pages, self.page_size, k, choose, mtp_step)
        ids = torch.cat([to_device(last, self.device).unsqueeze(1), drafts], dim=1).reshape(-1)
        batch = decode_batch(start, k + 1, pages, self.page_size, ids, self.device)
        if graphs is not None:
            logits, target_hidden = graphs.verify(batch)
        else:
            logits, target_hidden = self.model(batch, self.kv_cache, return_all_logits=True, return_hidden=True)
        logits = logits.view(bsz, k + 1, -1)
        n, tokens = greedy_verify(drafts, logits)
        if sampled:
            self._rejection(engine, rid_list, params, sampled, drafts, probs, logits, n, tokens)
        # MTP pass over the verified positions: row i gets token P+1+i (right up to row n)
        rows = torch.arange(bsz, device=self.device) * (k + 1) + n
        mtp_batch = dataclasses.replace(batch, input_ids=tokens.reshape(-1))
        if graphs is not None:
            mtp_logits, mtp_hidden = graphs.mtp_verified(mtp_batch, target_hidden, rows)
        else:
            mtp_logits, mtp_hidden = self.model.forward_mtp(
                mtp_batch, self.kv_cache, target_hidden, return_hidden=True, logit_rows=rows
            )
        next_first, q = choose(mtp_logits)
        self._store(rid_list, slots, next_first, mtp_hidden.index_select(0, rows), q, sampled)
        n_host, tok_host = n.tolist(), tokens.tolist()
        self.stats.record(n_host)
        for rid, acc in zip(rid_list, n_host, strict=True):
            s = self.request_stats.setdefault(rid, RequestSpecStats())
            s.verify_steps += 1
            s.draft_tokens += k
            s.accepted_tokens += acc
        return {rid: tok_host[b][: n_host[b] + 1] for b, rid in enumerate(rid_list)}

    def _rejection(
        self,
        engine: Any,
        rids: list[int],
        params: list[SamplingParams],
        sampled: list[int],
        drafts: torch.Tensor,
        probs: list[torch.Tensor | None],
        logits: torch.Tensor,
        n: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Rejection sampling for the non-greedy rows, written into ``n`` and ``tokens``."""
        k = self.k
        q_rows, p_rows, u_acc, u_tok = [], [], [], []
        for j, i in enumerate(sampled):
            rid = rids[i]
            q_first = self._first_probs.get(rid)
            if q_first is None:  # the request's draft 1 was made greedily (cannot happen while params are fixed)
                raise RuntimeError(f"request {rid}: sampling, but its first draft has no draft distribution")
            q_rows.append(torch.stack([q_first] + [step_q[j] for step_q in probs]))
            p_rows.append(target_probs(logits[i], params[i]))
            u = self._uniforms(engine, rid, params[i], k + 1)
            u_acc.append(u[:k])
            u_tok.append(u[k])
        idx = torch.tensor(sampled, device=self.device)
        n_s, tok_s = rejection_verify(
            drafts.index_select(0, idx), torch.stack(q_rows), torch.stack(p_rows), torch.stack(u_acc), torch.stack(u_tok)
        )
        n[idx] = n_s
        tokens[idx] = tok_s

    # ---- prefill chunks: target EXTEND, then the MTP layer over the chunk -------------------
    def _extend(
        self,
        engine: Any,
        chunk: np.ndarray,
        rids: np.ndarray,
        slots: np.ndarray,
        prefix: np.ndarray,
        extend: np.ndarray,
        ids: np.ndarray,
        starts: np.ndarray,
        pages: np.ndarray,
        sample: np.ndarray,
    ) -> dict[int, list[int]]:
        seqs = []
        for i in chunk:
            need = -(-int(prefix[i] + extend[i]) // self.page_size)
            seqs.append(SequenceInput(int(prefix[i]), ids[starts[i] : starts[i + 1]].tolist(), pages[i, :need].tolist()))
        batch = build_forward_batch(seqs, self.page_size, ForwardMode.EXTEND, self.device)
        logits, hidden = self.model(batch, self.kv_cache, return_hidden=True)
        sampled = [j for j, i in enumerate(chunk) if sample[i]]
        sampled_rids = [int(rids[chunk[j]]) for j in sampled]
        params = [engine._requests[r].params for r in sampled_rids]
        first_tokens: list[int] = []
        if sampled:
            rows = torch.tensor(sampled, device=self.device)
            first_tokens = engine.sampler.sample(logits.index_select(0, rows).float(), sampled_rids, params)
        # MTP row j: target hidden j with token j+1; the chunk's last row takes the token after it
        following = dict(zip(sampled, first_tokens, strict=True))
        shifted = []
        for j, i in enumerate(chunk):
            end = int(prefix[i] + extend[i])
            nxt = following[j] if j in following else engine.scheduler.request_info(int(rids[i]))["tokens"][end]
            shifted.append(ids[starts[i] + 1 : starts[i + 1]])
            shifted.append(np.array([nxt], dtype=np.int64))
        mtp_batch = dataclasses.replace(batch, input_ids=to_device(np.concatenate(shifted), self.device))
        last_rows = batch.last_token_indices().index_select(0, torch.tensor(sampled, device=self.device, dtype=torch.long))
        mtp_logits, mtp_hidden = self.model.forward_mtp(
            mtp_batch, self.kv_cache, hidden, return_hidden=True, logit_rows=last_rows
        )
        if sampled:
            choose, q_rows = self._chooser(engine, sampled_rids, params)
            first, q = choose(mtp_logits)
            self._store(sampled_rids, slots[chunk[sampled]], first, mtp_hidden.index_select(0, last_rows), q, q_rows)
        return {rid: [tok] for rid, tok in zip(sampled_rids, first_tokens, strict=True)}
