"""Model runner: turns a scheduler plan into ForwardBatches and returns sampled rows' logits.

A plan lists decodes first, then prefill chunks. Decodes (one new token over a cached
prefix) run as one DECODE batch, the absorbed-MLA path; chunks run as one EXTEND batch.
Chunks that do not finish their prompt still run (they write their KV) but produce no
logits row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch
from tokenspeed_engine.scheduler import Plan

# model(batch, kv_cache) -> logits [B, vocab] of each sequence's last new token
ModelFn = Callable[[Any, Any], torch.Tensor]


class TorchModelRunner:
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
    ) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.num_pages, self.page_size = num_pages, page_size
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.device = torch.device(device)

    @torch.inference_mode()
    def forward(self, plan: Plan, block_table: np.ndarray) -> torch.Tensor:
        ids, extend = np.asarray(plan.input_ids), np.asarray(plan.extend_lens)
        prefix, slots, sample = np.asarray(plan.prefix_lens), np.asarray(plan.slots), np.asarray(plan.sample, dtype=bool)
        starts = np.concatenate([[0], np.cumsum(extend)])
        groups: dict[ForwardMode, list[int]] = {ForwardMode.DECODE: [], ForwardMode.EXTEND: []}
        for i in range(len(extend)):
            mode = ForwardMode.DECODE if extend[i] == 1 and prefix[i] > 0 else ForwardMode.EXTEND
            groups[mode].append(i)
        rows: dict[int, torch.Tensor] = {}
        for mode, members in groups.items():
            if not members:
                continue
            seqs = []
            for i in members:
                total = int(prefix[i] + extend[i])
                pages = block_table[slots[i], : -(-total // self.page_size)]
                seqs.append(SequenceInput(int(prefix[i]), ids[starts[i] : starts[i + 1]].tolist(), pages.tolist()))
            batch = build_forward_batch(seqs, self.page_size, mode, self.device)
            logits = self.model(batch, self.kv_cache)
            for j, i in enumerate(members):
                if sample[i]:
                    rows[i] = logits[j]
        order = [i for i in range(len(extend)) if sample[i]]
        if not order:
            return torch.empty(0, self.vocab_size, device=self.device)
        return torch.stack([rows[i] for i in order]).float()
