"""DECODE batches of ``q_len`` new tokens per sequence, built from host arrays without a host sync.

Speculative decoding runs three kinds of DECODE forwards over the same reserved KV
positions: the MTP draft steps (q_len 1 at positions ``P .. P+k-2``), the target's verify
(q_len ``k+1`` at ``P .. P+k``) and the MTP pass over the verified tokens (the same
positions as the verify). The absorbed MLA decode reads the paged cache through the block
table only, so ``kv_slots`` (every cached token's slot, O(context) to build) stays empty.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenspeed_engine.forward_batch import ForwardBatch, ForwardMode, to_device


def decode_batch(
    start: np.ndarray,
    q_len: int,
    pages: np.ndarray,
    page_size: int,
    input_ids: torch.Tensor,
    device: torch.device | str,
) -> ForwardBatch:
    """A DECODE batch: sequence b writes positions ``start[b] .. start[b] + q_len - 1``.

    Args:
        start: int [B], the first new position of each sequence (= tokens cached before).
        q_len: new tokens per sequence (1 .. 8, the range ``mla_decode`` folds into heads).
        pages: int32 [B, W], block-table rows; W pages must cover ``start + q_len`` tokens and
            none of the covering entries may be the null page 0.
        input_ids: int64 [B * q_len] on ``device``, sequence by sequence.
    """
    start = np.asarray(start, dtype=np.int64)
    pages = np.asarray(pages, dtype=np.int32)
    bs = int(start.shape[0])
    if bs == 0:
        raise ValueError("decode_batch: empty batch")
    if not 1 <= q_len <= 8:
        raise ValueError(f"decode_batch: q_len must be in 1..8, got {q_len}")
    if pages.ndim != 2 or pages.shape[0] != bs:
        raise ValueError(f"decode_batch: pages must be [{bs}, W], got {pages.shape}")
    if input_ids.shape[0] != bs * q_len:
        raise ValueError(f"decode_batch: {input_ids.shape[0]} input ids for {bs} sequences of {q_len}")
    seq_lens = start + q_len
    needed = -(-seq_lens // page_size)
    if int(needed.max()) > pages.shape[1]:
        b = int(np.argmax(needed > pages.shape[1]))
        raise ValueError(f"sequence {b}: {seq_lens[b]} tokens need {needed[b]} pages, the block table has {pages.shape[1]}")
    inside = np.arange(pages.shape[1])[None, :] < needed[:, None]
    if (pages[inside] <= 0).any():
        b = int(np.argmax(((pages <= 0) & inside).any(axis=1)))
        raise ValueError(f"sequence {b}: block table uses page 0 (the null page) or a negative page")
    positions = (start[:, None] + np.arange(q_len)[None, :]).reshape(-1)
    rows = np.repeat(np.arange(bs), q_len)
    loc = pages[rows, positions // page_size].astype(np.int64) * page_size + positions % page_size
    cu_q = np.arange(bs + 1, dtype=np.int32) * q_len
    cu_k = np.zeros(bs + 1, dtype=np.int32)
    np.cumsum(seq_lens, out=cu_k[1:])
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=input_ids,
        positions=to_device(positions, device),
        seq_lens=to_device(seq_lens.astype(np.int32), device),
        extend_lens=to_device(np.full(bs, q_len, dtype=np.int32), device),
        prefix_lens=to_device(start.astype(np.int32), device),
        cu_seqlens_q=to_device(cu_q, device),
        cu_seqlens_k=to_device(cu_k, device),
        block_table=to_device(pages, device),
        page_size=page_size,
        out_cache_loc=to_device(loc, device),
        kv_slots=torch.zeros(0, dtype=torch.int64, device=device),
        q_len=q_len,
        max_extend_len=q_len,
        max_seq_len=int(seq_lens.max()),
    )
