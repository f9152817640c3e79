"""Model runner: turns a scheduler plan into ForwardBatches and returns sampled rows' logits.

A plan lists decodes first, then prefill chunks. Decodes (one new token over a cached
prefix) run as one DECODE batch, the absorbed-MLA path, replayed from a CUDA graph when the
runner captured one for that batch size (:mod:`tokenspeed_engine.cuda_graph`); chunks run
as one EXTEND batch. Chunks that do not finish their prompt still run (they write their KV)
but produce no logits row.

The plan is first reduced to :class:`StepInputs` (host arrays): that is all a rank needs
to run the step, so tensor-parallel workers receive exactly this
(:mod:`tokenspeed_engine.tp_worker`). Input ids may come as a device tensor instead of the
plan's: under one-step overlap the plan holds -1 where the token is still being sampled on
the device, and the engine fills those from the previous step's output without a host sync.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenspeed_engine.cuda_graph import (
    DecodeGraphs,
    decode_forward_batch,
    decode_inputs,
    decode_reads_block_table,
    graphs_supported,
)
from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch, to_device
from tokenspeed_engine.scheduler import Plan

log = logging.getLogger("tokenspeed.model_runner")

# model(batch, kv_cache) -> logits [B, vocab] of each sequence's last new token
ModelFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class StepInputs:
    """One step's batch as host arrays, in plan order (what every tensor-parallel rank runs)."""

    input_ids: np.ndarray  # int64 [T], entries' tokens back to back; -1: supplied as a device tensor
    prefix_lens: np.ndarray  # int64 [N], tokens already in the KV cache
    extend_lens: np.ndarray  # int64 [N], new tokens
    sample: np.ndarray  # bool [N], the entry produces a logits row
    pages: np.ndarray  # int32 [N, W], block-table rows (W pages cover the longest entry)

    @classmethod
    def from_plan(cls, plan: Plan, block_table: np.ndarray, page_size: int) -> StepInputs:
        prefix = np.asarray(plan.prefix_lens, dtype=np.int64)
        extend = np.asarray(plan.extend_lens, dtype=np.int64)
        width = int(-(-(prefix + extend).max() // page_size)) if len(prefix) else 0
        # a copy: the scheduler's view changes at its next call, and overlap plans ahead
        pages = np.asarray(block_table)[np.asarray(plan.slots, dtype=np.int64), :width].astype(np.int32, copy=False)
        return cls(
            np.asarray(plan.input_ids, dtype=np.int64),
            prefix,
            extend,
            np.asarray(plan.sample, dtype=bool),
            pages,
        )

    @property
    def num_entries(self) -> int:
        return int(self.prefix_lens.shape[0])


class TorchModelRunner:
    """Runs a tokenspeed model on its paged KV cache; ``cuda_graph_max_bs`` > 0 captures decode graphs."""

    supports_overlap = True  # forward() takes device input ids

    def __init__(
        self,
        model: ModelFn,
        kv_cache: Any,
        *,
        num_pages: int,
        page_size: int,
        max_model_len: int,
        vocab_size: int,
        device: torch.device | str = "cpu",
        cuda_graph_max_bs: int = 0,
    ) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.num_pages, self.page_size = num_pages, page_size
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.device = torch.device(device)
        # decode block tables always have the scheduler's full width (see cuda_graph's docstring)
        self.max_pages = -(-max_model_len // page_size)
        self._decode_kv_slots = not decode_reads_block_table(model)
        self.graphs: DecodeGraphs | None = None
        if cuda_graph_max_bs > 0:
            ok, why = graphs_supported(model, self.device)
            if ok:
                self.graphs = DecodeGraphs(model, kv_cache, cuda_graph_max_bs, self.max_pages, page_size, self.device)
                self.graphs.capture()
            else:
                log.info("CUDA graphs off: %s", why)

    def forward(self, plan: Plan, block_table: np.ndarray, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """logits [entries with sample=1, vocab] (fp32), in plan order; ``input_ids`` [T] on the device
        replaces the plan's ids (it must, where the plan has -1)."""
        return self.execute(StepInputs.from_plan(plan, block_table, self.page_size), input_ids)

    @torch.inference_mode()
    def execute(self, step: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is None:
            if (step.input_ids < 0).any():
                raise ValueError("the plan has input ids still unknown (-1); pass them as input_ids")
            input_ids = to_device(step.input_ids, self.device)
        if input_ids.shape[0] != step.input_ids.shape[0]:
            raise ValueError(f"input_ids has {input_ids.shape[0]} tokens, the plan {step.input_ids.shape[0]}")
        n = step.num_entries
        if n == 0:
            return torch.empty(0, self.vocab_size, device=self.device)
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(step.extend_lens, out=starts[1:])
        is_decode = (step.extend_lens == 1) & (step.prefix_lens > 0)
        parts, owners = [], []
        for members, run in ((np.flatnonzero(is_decode), self._decode), (np.flatnonzero(~is_decode), self._extend)):
            if members.size:
                parts.append(run(step, members, starts, input_ids))
                owners.append(members)
        row_of = np.empty(n, dtype=np.int64)
        row_of[np.concatenate(owners)] = np.arange(n)
        wanted = row_of[step.sample]
        if wanted.size == 0:
            return torch.empty(0, self.vocab_size, device=self.device)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        return logits.index_select(0, to_device(wanted, self.device)).float()

    def _decode(self, step: StepInputs, members: np.ndarray, starts: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.index_select(0, to_device(starts[members], self.device))
        bucket = self.graphs.bucket(len(members)) if self.graphs is not None else None
        inputs = decode_inputs(step.prefix_lens[members], step.pages[members], self.page_size, self.max_pages, bucket)
        if bucket is not None:
            return self.graphs.run(inputs, ids)
        batch = decode_forward_batch(inputs, ids, self.page_size, self.device, self._decode_kv_slots)
        return self.model(batch, self.kv_cache)

    def _extend(self, step: StepInputs, members: np.ndarray, starts: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        seqs, token_rows = [], []
        for i in members:
            rows = np.arange(starts[i], starts[i + 1])
            token_rows.append(rows)
            need = -(-int(step.prefix_lens[i] + step.extend_lens[i]) // self.page_size)
            # token ids travel as the device tensor below; the host list only gives the lengths
            seqs.append(SequenceInput(int(step.prefix_lens[i]), step.input_ids[rows].tolist(), step.pages[i, :need].tolist()))
        batch = build_forward_batch(seqs, self.page_size, ForwardMode.EXTEND, self.device)
        batch.input_ids = ids.index_select(0, to_device(np.concatenate(token_rows), self.device))
        return self.model(batch, self.kv_cache)
