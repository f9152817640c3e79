"""Vocabulary-parallel embedding and LM head.

The vocabulary is split in equal padded shards over the group (``ceil(vocab / g)`` rows per
rank, padding rows zero). The embedding is an SPMD stage ``Replicate -> Partial`` (a rank
contributes only its shard's rows); the LM head ``Replicate -> Shard(-1)`` (its shard's
logits), which the compiler all-gathers. Tied embeddings share one parameter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenspeed_engine.loader.source import TensorSource, check_shape
from tokenspeed_engine.spmd.groups import ParallelGroup
from tokenspeed_engine.spmd.placement import Layout, Partial, Replicate, Shard


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over ``group``; output Partial over it."""

    def __init__(self, vocab_size: int, hidden: int, group: ParallelGroup, dtype: Any = None, device: Any = None):
        super().__init__()
        self.vocab_size, self.hidden, self.group = vocab_size, hidden, group
        self.shard_rows = -(-vocab_size // group.size)
        self.start = group.rank * self.shard_rows
        self.weight = nn.Parameter(
            torch.zeros(self.shard_rows, hidden, dtype=dtype, device=device), requires_grad=False
        )
        self.weight.weight_loader = self.load_weight
        self.spmd_in = Layout(group.name, Replicate())
        self.spmd_out = Layout(group.name, Partial())

    def load_weight(self, param: nn.Parameter, src: TensorSource, shard_id: Any = None) -> None:
        check_shape(src, (self.vocab_size, self.hidden), "the vocabulary-parallel embedding")
        rows = max(0, min(self.shard_rows, self.vocab_size - self.start))
        param.data.zero_()
        if rows:
            param.data[:rows].copy_(src.narrow(0, self.start, rows).load().to(param.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.shard_rows)
        out = F.embedding(local.clamp(0, self.shard_rows - 1), self.weight)
        return out * inside.unsqueeze(-1).to(out.dtype)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary shard; ``tied_to`` reuses an embedding's parameter."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        group: ParallelGroup,
        tied_to: VocabParallelEmbedding | None = None,
        dtype: Any = None,
        device: Any = None,
    ):
        super().__init__(vocab_size, hidden, group, dtype, device if tied_to is None else "meta")
        self.tied = tied_to is not None
        if tied_to is not None:
            self.weight = tied_to.weight  # one parameter, loaded once through the embedding
        self.spmd_out = Layout(group.name, Shard(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)
