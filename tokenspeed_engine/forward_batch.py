"""ForwardBatch: what one model forward needs to know about the batch and its paged KV.

Tokens of all sequences are packed back to back (no padding). Positions count from the
start of each sequence; ``seq_lens`` include the new tokens. The KV of token t is written
to slot ``out_cache_loc[t] = page * page_size + offset`` of every layer's cache, with
``page = block_table[b, pos // page_size]``. Page 0 is the null page: the scheduler never
hands it out, so unused block-table entries may hold 0.

EXTEND covers prefill and chunked prefill (a chunk over a cached prefix); DECODE covers one
new token per sequence, or ``q_len = k + 1`` per sequence for speculative verification
(then every sequence has the same q_len).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill / chunked prefill: non-absorbed MLA attention
    DECODE = "decode"  # q_len new tokens per sequence: absorbed MLA attention over the paged cache


@dataclass
class ForwardBatch:
    """One forward's batch. Tensors live on the model's device; the ``max_*``/``total_*`` ints are host values."""

    mode: ForwardMode
    input_ids: torch.Tensor  # int64 [T], new tokens of every sequence, packed
    positions: torch.Tensor  # int64 [T], absolute position of each new token
    seq_lens: torch.Tensor  # int32 [B], tokens in the cache per sequence *including* the new ones
    extend_lens: torch.Tensor  # int32 [B], new tokens per sequence
    prefix_lens: torch.Tensor  # int32 [B], tokens already cached before this forward
    cu_seqlens_q: torch.Tensor  # int32 [B+1], cumulative extend_lens from 0
    cu_seqlens_k: torch.Tensor  # int32 [B+1], cumulative seq_lens from 0
    block_table: torch.Tensor  # int32 [B, max_pages], physical page of each logical page
    page_size: int
    out_cache_loc: torch.Tensor  # int64 [T], KV write slot of each new token
    kv_slots: torch.Tensor  # int64 [sum(seq_lens)], slot of every cached token, sequence by sequence
    q_len: int  # DECODE: new tokens per sequence (1, or k+1 for speculative verify); EXTEND: max_extend_len
    max_extend_len: int
    max_seq_len: int

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE

    def last_token_indices(self) -> torch.Tensor:
        """Row of each sequence's last new token in the packed token dimension, int64 [B]."""
        return self.cu_seqlens_q[1:].long() - 1


@dataclass
class SequenceInput:
    """One sequence of a batch, as the scheduler sees it."""

    prefix_len: int  # tokens already in the KV cache
    token_ids: Sequence[int]  # the new tokens
    pages: Sequence[int]  # block-table row: physical pages of logical pages 0, 1, ...


def to_device(a: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host array -> tensor on ``device`` without a host sync.

    On CUDA the data goes through pinned memory with a non-blocking copy: a copy from pageable
    memory may wait for the stream, which would stall the overlap loop behind the step the
    GPU is running. Torch's pinned-memory cache keeps the staging block until the copy has run.
    """
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _slots(prefix: int, new: int, pages: torch.Tensor, page_size: int, start: int = 0) -> torch.Tensor:
    pos = torch.arange(start, prefix + new, dtype=torch.int64)
    return pages[pos // page_size] * page_size + pos % page_size


def build_forward_batch(
    sequences: Sequence[SequenceInput],
    page_size: int,
    mode: ForwardMode = ForwardMode.EXTEND,
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """Build a ForwardBatch from per-sequence (prefix length, new tokens, block-table row).

    Validates that every block-table row covers its sequence and never uses the null page 0,
    and that DECODE sequences all have the same number of new tokens.
    """
    if not sequences:
        raise ValueError("build_forward_batch: empty batch")
    new = [len(s.token_ids) for s in sequences]
    if mode is ForwardMode.DECODE and len(set(new)) != 1:
        raise ValueError(f"DECODE needs the same number of new tokens per sequence, got {new}")
    if min(new) < 1:
        raise ValueError("every sequence needs at least one new token")
    max_pages = max(len(s.pages) for s in sequences)
    table = torch.zeros(len(sequences), max(max_pages, 1), dtype=torch.int32)
    ids, positions, out_loc, kv_slots = [], [], [], []
    for b, s in enumerate(sequences):
        total = s.prefix_len + len(s.token_ids)
        needed = -(-total // page_size)
        pages = torch.tensor(list(s.pages), dtype=torch.int64)
        if len(pages) < needed:
            raise ValueError(f"sequence {b}: {total} tokens need {needed} pages, the block table has {len(pages)}")
        if (pages[:needed] <= 0).any():
            raise ValueError(f"sequence {b}: block table uses page 0 (the null page) or a negative page: {s.pages}")
        table[b, : len(pages)] = pages.to(torch.int32)
        ids.append(torch.tensor(list(s.token_ids), dtype=torch.int64))
        positions.append(torch.arange(s.prefix_len, total, dtype=torch.int64))
        out_loc.append(_slots(s.prefix_len, len(s.token_ids), pages, page_size, start=s.prefix_len))
        kv_slots.append(_slots(s.prefix_len, len(s.token_ids), pages, page_size))
    seq_lens = torch.tensor([s.prefix_len + n for s, n in zip(sequences, new, strict=True)], dtype=torch.int32)
    extend = torch.tensor(new, dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return to_device(t, device)

    return ForwardBatch(
        mode=mode,
        input_ids=dev(torch.cat(ids)),
        positions=dev(torch.cat(positions)),
        seq_lens=dev(seq_lens),
        extend_lens=dev(extend),
        prefix_lens=dev(torch.tensor([s.prefix_len for s in sequences], dtype=torch.int32)),
        cu_seqlens_q=dev(torch.cat([zero, extend.cumsum(0).to(torch.int32)])),
        cu_seqlens_k=dev(torch.cat([zero, seq_lens.cumsum(0).to(torch.int32)])),
        block_table=dev(table),
        page_size=page_size,
        out_cache_loc=dev(torch.cat(out_loc)),
        kv_slots=dev(torch.cat(kv_slots)),
        q_len=max(new),
        max_extend_len=max(new),
        max_seq_len=int(seq_lens.max()),
    )
