"""CUDA graphs for speculative decoding: the verify forward and both MTP forwards, per batch bucket.

A speculative step at small batch is launch-bound: the verify runs every layer of the target
on k+1 tokens per request, the MTP layer runs k times. Each of the three forwards is captured
once per batch-size bucket (:func:`tokenspeed_engine.cuda_graph.decode_buckets`) over static
buffers and replayed:

* ``verify``: the target, DECODE with q_len k+1, logits and hidden states of every row;
* ``mtp_verified``: the MTP layer over the same positions (same batch buffers, its own input
  ids and the target's hidden states), logits only for one row per request;
* ``mtp_step``: the MTP layer, DECODE with q_len 1 (drafts 2..k).

Padding rows (a bucket larger than the batch) are harmless sequences as in
``tokenspeed_engine.cuda_graph``: positions 0..q_len-1 on the null page 0 (block-table row all
0, KV writes into page 0's first slots, which no request reads). Block tables always have the
scheduler's full width so eager and graphed launches size their kernels alike.

The buffer loading and padding are plain tensor code, exercised on the CPU by running the
same static-buffer forwards eagerly (``capture=False``); only the capture needs a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from tokenspeed_engine.cuda_graph import decode_buckets, pick_bucket, static_decode_batch
from tokenspeed_engine.forward_batch import ForwardBatch

log = logging.getLogger("tokenspeed.speculative")


class StaticDecodeBatch:
    """Device buffers of a DECODE batch of up to ``max_bs`` sequences of ``q_len`` new tokens."""

    def __init__(
        self, max_bs: int, q_len: int, width: int, page_size: int, hidden: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.max_bs, self.q_len, self.width, self.page_size = max_bs, q_len, width, page_size
        t = max_bs * q_len
        kw: dict[str, Any] = {"device": device}
        self.input_ids = torch.zeros(t, dtype=torch.int64, **kw)
        self.mtp_ids = torch.zeros(t, dtype=torch.int64, **kw)  # the MTP pass over the same positions
        self.hidden = torch.zeros(t, hidden, dtype=dtype, **kw)  # prev_hidden of the MTP forwards
        self.rows = torch.zeros(max_bs, dtype=torch.int64, **kw)  # MTP rows that get logits
        offsets = torch.arange(t, dtype=torch.int64, **kw) % q_len
        self.pad_positions = offsets  # padding row: positions 0 .. q_len-1
        self.pad_loc = offsets % page_size  # on the null page (its table row is all 0)
        self.positions = offsets.clone()
        self.out_cache_loc = self.pad_loc.clone()
        self.seq_lens = torch.full((max_bs,), q_len, dtype=torch.int32, **kw)
        self.prefix_lens = torch.zeros(max_bs, dtype=torch.int32, **kw)
        self.extend_lens = torch.full((max_bs,), q_len, dtype=torch.int32, **kw)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, **kw) * q_len
        self.cu_seqlens_k = torch.arange(max_bs + 1, dtype=torch.int32, **kw) * q_len
        self.block_table = torch.zeros(max_bs, width, dtype=torch.int32, **kw)
        self.kv_slots = torch.zeros(0, dtype=torch.int64, **kw)  # the absorbed decode never reads it

    def load(
        self,
        batch: ForwardBatch | None,
        bs: int,
        mtp_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> int:
        """Copy ``batch`` (n sequences, q_len each; None: padding only) into rows [0, n) and pad
        rows [n, bs). Returns n."""
        q = self.q_len
        n = 0 if batch is None else batch.batch_size
        if batch is not None and (batch.q_len != q or batch.block_table.shape[1] > self.width):
            raise ValueError(
                f"batch of q_len {batch.q_len}, width {batch.block_table.shape[1]} does not fit q_len {q}, width {self.width}"
            )
        if not n <= bs <= self.max_bs:
            raise ValueError(f"{n} sequences in a bucket of {bs} (largest {self.max_bs})")
        real, pad = slice(0, n * q), slice(n * q, bs * q)
        if batch is not None:
            self.input_ids[real].copy_(batch.input_ids)
            self.positions[real].copy_(batch.positions)
            self.out_cache_loc[real].copy_(batch.out_cache_loc)
            self.seq_lens[:n].copy_(batch.seq_lens)
            w = batch.block_table.shape[1]
            self.block_table[:n, :w].copy_(batch.block_table)
            self.block_table[:n, w:].zero_()
        self.input_ids[pad].zero_()
        self.positions[pad].copy_(self.pad_positions[pad])
        self.out_cache_loc[pad].copy_(self.pad_loc[pad])
        self.seq_lens[n:bs].fill_(q)
        self.block_table[n:bs].zero_()
        self.prefix_lens[:bs].copy_(self.seq_lens[:bs] - q)
        self.cu_seqlens_k[1 : bs + 1].copy_(torch.cumsum(self.seq_lens[:bs], 0))
        for buf, src in ((self.mtp_ids, mtp_ids), (self.hidden, hidden)):
            if src is not None:
                buf[real].copy_(src)
            buf[pad].zero_()
        if rows is not None:
            self.rows[:n].copy_(rows)
        self.rows[n:bs].copy_(torch.arange(n, bs, device=self.rows.device) * q)
        return n

    def batch(self, bs: int, mtp: bool = False) -> ForwardBatch:
        """A DECODE ForwardBatch of views of the first ``bs`` sequences (the MTP input ids when ``mtp``)."""
        return static_decode_batch(self, bs, self.q_len, self.page_size, self.mtp_ids if mtp else self.input_ids)


class _Graphs:
    """One forward over static buffers, captured per bucket (or, without capture, run eagerly on them)."""

    def __init__(self, fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.fn = fn
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(self, bs: int, pool: Any, side: torch.cuda.Stream) -> Any:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compilation, cuBLAS workspaces
            for _ in range(2):
                self.fn(bs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.outputs[bs] = self.fn(bs)
        self.graphs[bs] = graph
        return graph.pool()

    def run(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        graph = self.graphs.get(bs)
        if graph is None:
            return self.fn(bs)
        graph.replay()
        return self.outputs[bs]


class SpecGraphs:
    """The three speculative forwards of a SpeculativeDecoder, over static buffers per bucket."""

    def __init__(self, model: Any, kv_cache: Any, k: int, max_bs: int, width: int, page_size: int, device: torch.device) -> None:
        self.model, self.kv_cache, self.k = model, kv_cache, k
        self.buckets = decode_buckets(max_bs)
        hidden, dtype = model.config.hidden_size, model.dtype
        top = self.buckets[-1]
        self.wide = StaticDecodeBatch(top, k + 1, width, page_size, hidden, dtype, device)
        self.narrow = StaticDecodeBatch(top, 1, width, page_size, hidden, dtype, device)
        w, nb = self.wide, self.narrow
        self._verify = _Graphs(lambda bs: model(w.batch(bs), kv_cache, return_all_logits=True, return_hidden=True))
        self._mtp_verified = _Graphs(
            lambda bs: model.forward_mtp(
                w.batch(bs, mtp=True), kv_cache, w.hidden[: bs * (k + 1)], return_hidden=True, logit_rows=w.rows[:bs]
            )
        )
        self._mtp_step = _Graphs(lambda bs: model.forward_mtp(nb.batch(bs), kv_cache, nb.hidden[:bs], return_hidden=True))

    @classmethod
    def create(cls, decoder: Any, max_bs: int, max_model_len: int, capture: bool | None = None) -> SpecGraphs:
        """Graphs for ``decoder``'s model; block tables as wide as the scheduler's
        (``max_model_len + k`` tokens). ``capture`` None: capture on CUDA, run eagerly elsewhere."""
        width = -(-(max_model_len + decoder.k) // decoder.page_size)
        g = cls(decoder.model, decoder.kv_cache, decoder.k, max_bs, width, decoder.page_size, decoder.device)
        if capture if capture is not None else decoder.device.type == "cuda":
            g.capture()
        return g

    def fits(self, n: int) -> bool:
        return pick_bucket(n, self.buckets) is not None

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory pool). The buffers
        hold padding only, so warm-up and capture write nothing but the null page."""
        t0 = time.perf_counter()
        pool, side = None, torch.cuda.Stream()
        for bs in reversed(self.buckets):
            self.wide.load(None, bs)
            self.narrow.load(None, bs)
            for graphs in (self._verify, self._mtp_verified, self._mtp_step):
                pool = graphs.capture(bs, pool, side)
        torch.cuda.synchronize()
        log.info(
            "CUDA graphs: speculative verify (q_len %d) and MTP forwards captured for batch sizes %s in %.1f s",
            self.k + 1,
            self.buckets,
            time.perf_counter() - t0,
        )

    # ---- replays: each returns fresh tensors of the real rows ---------------------------------
    def verify(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The target over ``batch`` (q_len k+1): logits [n(k+1), vocab], hidden [n(k+1), hidden]."""
        bs = pick_bucket(batch.batch_size, self.buckets)
        n = self.wide.load(batch, bs)
        logits, hidden = self._verify.run(bs)
        t = n * (self.k + 1)
        return logits[:t].clone(), hidden[:t].clone()

    def mtp_verified(
        self, batch: ForwardBatch, target_hidden: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP layer over the verify's positions with ``batch.input_ids`` (the buffers of the
        verify just run stay loaded): logits [n, vocab] of ``rows``, hidden [n(k+1), hidden]."""
        bs = pick_bucket(batch.batch_size, self.buckets)
        n, t = batch.batch_size, batch.batch_size * (self.k + 1)
        self.wide.mtp_ids[:t].copy_(batch.input_ids)
        self.wide.hidden[:t].copy_(target_hidden)
        self.wide.rows[:n].copy_(rows)
        logits, hidden = self._mtp_verified.run(bs)
        return logits[:n].clone(), hidden[:t].clone()

    def mtp_step(self, batch: ForwardBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One recursive MTP step (q_len 1): logits [n, vocab], hidden [n, hidden]."""
        bs = pick_bucket(batch.batch_size, self.buckets)
        n = self.narrow.load(batch, bs, hidden=hidden)
        logits, out = self._mtp_step.run(bs)
        return logits[:n].clone(), out[:n].clone()
