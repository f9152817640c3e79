"""CUDA graphs for decode: one graph per padded batch-size bucket, replayed over static buffers.

Why: a DeepSeek-V3 decode step launches hundreds of small kernels (per layer: projections,
rotary, the paged KV write, MLA decode, routing, experts, norms); at small batch the launch
overhead is as large as the GPU work. A graph replays the whole forward with one launch.

What makes a replay valid:

* Every tensor the decode forward reads lives in a static buffer sized for the largest
  bucket. A step copies its rows into the first ``bs`` rows (``bs`` = the smallest bucket
  that holds the batch) and pads the rest as a harmless sequence: token 0 at position 0,
  ``seq_len`` 1, the block-table row all null page 0 and KV write slot 0, i.e. the first slot
  of the null page, which the scheduler never hands out, so no real sequence reads it.
* The block table has the full width ``ceil(max_model_len / page_size)``, in graphs and in
  eager decodes alike: kernels that size their grid from shapes (the split-KV decode) then
  choose the same launch both ways, so at a bucket's own batch size graph and eager agree
  bit for bit.
* The decode forward's shapes must depend on the batch size only. DeepSeek-V3's absorbed
  MLA decode qualifies (``mla_decode`` reads the block table and ``cache_seqlens`` on the
  device, with no host sync). Llama's decode gathers the KV of every cached token (a
  length-dependent shape), so graphs stay off for it (see :func:`graphs_supported`).

The bucket choice, the padding and the buffer layout are plain functions so they are
tested on the CPU; only :meth:`DecodeGraphs.capture` needs a GPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenspeed_engine.forward_batch import ForwardBatch, ForwardMode, to_device

log = logging.getLogger("tokenspeed.cuda_graph")


def decode_buckets(max_bs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, 16, then every 16 up to ``max_bs`` (always included).

    Powers of two at small sizes waste at most half a tiny batch; steps of 16 above bound the
    padding to 15 rows while keeping the number of graphs (capture time, memory) small.
    """
    if max_bs < 1:
        raise ValueError(f"cuda_graph_max_bs must be >= 1, got {max_bs}")
    sizes = [b for b in (1, 2, 4, 8, 16) if b <= max_bs] + list(range(32, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def pick_bucket(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``n`` sequences; None when ``n`` exceeds the largest (run eager)."""
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class DecodeInputs:
    """Host arrays of one decode batch (one new token per sequence), padded to ``batch_size`` rows."""

    positions: np.ndarray  # int64 [bs]: the new token's position (= tokens already cached)
    seq_lens: np.ndarray  # int32 [bs]: cached tokens including the new one
    out_cache_loc: np.ndarray  # int64 [bs]: KV write slot, page * page_size + offset
    block_table: np.ndarray  # int32 [bs, width]
    num_real: int  # rows [0, num_real) are sequences; the rest are padding

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])


def decode_inputs(
    prefix_lens: np.ndarray, pages: np.ndarray, page_size: int, width: int, pad_to: int | None = None
) -> DecodeInputs:
    """Decode inputs of sequences with ``prefix_lens`` cached tokens and block-table rows ``pages``.

    ``pages`` [n, w] (w <= width) is widened to ``width`` with the null page; rows past ``n``
    up to ``pad_to`` are padding (see the module docstring). Raises ValueError when a row does
    not cover its sequence or uses page 0 inside it.
    """
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    pages = np.asarray(pages, dtype=np.int32)
    n = int(prefix.shape[0])
    bs = n if pad_to is None else pad_to
    if bs < n:
        raise ValueError(f"decode_inputs: pad_to={pad_to} is smaller than the batch ({n})")
    if pages.ndim != 2 or pages.shape[0] != n or pages.shape[1] > width:
        raise ValueError(f"decode_inputs: pages must be [{n}, <= {width}], got {pages.shape}")
    needed = prefix // page_size + 1  # pages covering positions [0, prefix]
    if n and int(needed.max()) > pages.shape[1]:
        b = int(np.argmax(needed > pages.shape[1]))
        raise ValueError(f"sequence {b}: {prefix[b] + 1} tokens need {needed[b]} pages, the block table has {pages.shape[1]}")
    inside = np.arange(pages.shape[1])[None, :] < needed[:, None]
    if (pages[inside] <= 0).any():
        b = int(np.argmax(((pages <= 0) & inside).any(axis=1)))
        raise ValueError(f"sequence {b}: block table uses page 0 (the null page) or a negative page")
    table = np.zeros((bs, width), dtype=np.int32)
    table[:n, : pages.shape[1]] = pages
    positions = np.zeros(bs, dtype=np.int64)
    positions[:n] = prefix
    seq_lens = np.ones(bs, dtype=np.int32)
    seq_lens[:n] = prefix + 1
    loc = np.zeros(bs, dtype=np.int64)
    if n:
        loc[:n] = pages[np.arange(n), prefix // page_size].astype(np.int64) * page_size + prefix % page_size
    return DecodeInputs(positions, seq_lens, loc, table, n)


def kv_slots_of(inputs: DecodeInputs, page_size: int) -> np.ndarray:
    """Slot of every cached token of every row, sequence by sequence (ForwardBatch.kv_slots)."""
    n = inputs.batch_size
    lens = inputs.seq_lens[:n].astype(np.int64)
    seq = np.repeat(np.arange(n), lens)
    pos = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return inputs.block_table[seq, pos // page_size].astype(np.int64) * page_size + pos % page_size


def decode_forward_batch(
    inputs: DecodeInputs, input_ids: torch.Tensor, page_size: int, device: torch.device | str, kv_slots: bool = True
) -> ForwardBatch:
    """An eager DECODE ForwardBatch of ``inputs`` (all rows, padding included), ids already on the device.

    ``kv_slots=False`` leaves ``kv_slots`` empty: a model whose decode reads the cache through the
    block table (:func:`decode_reads_block_table`) needs no per-token slot list, which would cost
    host work and a copy proportional to the whole batch's context every step."""
    bs = inputs.batch_size
    if input_ids.shape[0] != bs:
        raise ValueError(f"decode_forward_batch: {input_ids.shape[0]} input ids for a batch of {bs}")
    seq_lens = inputs.seq_lens
    cu_k = np.zeros(bs + 1, dtype=np.int32)
    np.cumsum(seq_lens, out=cu_k[1:])
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=input_ids,
        positions=to_device(inputs.positions, device),
        seq_lens=to_device(seq_lens, device),
        extend_lens=to_device(np.ones(bs, dtype=np.int32), device),
        prefix_lens=to_device(seq_lens - 1, device),
        cu_seqlens_q=to_device(np.arange(bs + 1, dtype=np.int32), device),
        cu_seqlens_k=to_device(cu_k, device),
        block_table=to_device(inputs.block_table, device),
        page_size=page_size,
        out_cache_loc=to_device(inputs.out_cache_loc, device),
        kv_slots=to_device(kv_slots_of(inputs, page_size) if kv_slots else np.zeros(0, np.int64), device),
        q_len=1,
        max_extend_len=1,
        max_seq_len=int(seq_lens.max()),
    )


def decode_reads_block_table(model: Any) -> bool:
    """True when ``model``'s decode reads the paged cache only through ``block_table`` and
    ``seq_lens`` (DeepSeek-V3's absorbed MLA); False when it gathers ``kv_slots`` (Llama)."""
    from tokenspeed_engine.models.deepseek_v3 import DeepseekV3ForCausalLM

    return isinstance(model, DeepseekV3ForCausalLM)


def graphs_supported(model: Any, device: torch.device) -> tuple[bool, str]:
    """Whether decode of ``model`` on ``device`` can be captured; the reason when not."""
    if device.type != "cuda":
        return False, f"device is {device.type}"
    if not decode_reads_block_table(model):
        return False, f"{type(model).__name__} decode gathers the whole KV per token (length-dependent shapes)"
    return True, ""


class StaticDecodeBuffers:
    """Device tensors every captured decode reads, sized for ``max_bs`` sequences."""

    def __init__(self, max_bs: int, width: int, device: torch.device):
        kw = {"device": device}
        self.max_bs, self.width = max_bs, width
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, **kw)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, **kw)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, **kw)
        self.prefix_lens = torch.zeros(max_bs, dtype=torch.int32, **kw)
        self.extend_lens = torch.ones(max_bs, dtype=torch.int32, **kw)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.int64, **kw)
        self.block_table = torch.zeros(max_bs, width, dtype=torch.int32, **kw)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, **kw)
        self.cu_seqlens_k = torch.arange(max_bs + 1, dtype=torch.int32, **kw)
        # The graphed decode reads the paged cache through the block table only; an empty
        # kv_slots makes any code that would read it produce nothing rather than stale rows.
        self.kv_slots = torch.zeros(0, dtype=torch.int64, **kw)

    def load(self, inputs: DecodeInputs, input_ids: torch.Tensor) -> None:
        """Copy a (padded) batch into rows [0, batch_size); ids are a device tensor of the real rows."""
        bs, n = inputs.batch_size, inputs.num_real
        if bs > self.max_bs or inputs.block_table.shape[1] != self.width:
            raise ValueError(f"batch {bs} x {inputs.block_table.shape[1]} does not fit {self.max_bs} x {self.width}")
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:bs].zero_()
        dev = self.input_ids.device
        cu_k = np.zeros(bs + 1, dtype=np.int32)
        np.cumsum(inputs.seq_lens, out=cu_k[1:])
        self.positions[:bs].copy_(to_device(inputs.positions, dev))
        self.seq_lens[:bs].copy_(to_device(inputs.seq_lens, dev))
        self.prefix_lens[:bs].copy_(to_device(inputs.seq_lens - 1, dev))
        self.out_cache_loc[:bs].copy_(to_device(inputs.out_cache_loc, dev))
        self.block_table[:bs].copy_(to_device(inputs.block_table, dev))
        self.cu_seqlens_k[: bs + 1].copy_(to_device(cu_k, dev))

    def batch(self, bs: int, page_size: int) -> ForwardBatch:
        """A DECODE ForwardBatch of views of the first ``bs`` rows (what a graph is captured on)."""
        return static_decode_batch(self, bs, 1, page_size, self.input_ids)


def static_decode_batch(buf: Any, bs: int, q_len: int, page_size: int, input_ids: torch.Tensor) -> ForwardBatch:
    """A DECODE ForwardBatch of views of static buffers (``StaticDecodeBuffers`` or the
    speculative verify's): ``bs`` sequences of ``q_len`` tokens each, token rows first."""
    t = bs * q_len
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=input_ids[:t],
        positions=buf.positions[:t],
        seq_lens=buf.seq_lens[:bs],
        extend_lens=buf.extend_lens[:bs],
        prefix_lens=buf.prefix_lens[:bs],
        cu_seqlens_q=buf.cu_seqlens_q[: bs + 1],
        cu_seqlens_k=buf.cu_seqlens_k[: bs + 1],
        block_table=buf.block_table[:bs],
        page_size=page_size,
        out_cache_loc=buf.out_cache_loc[:t],
        kv_slots=buf.kv_slots,
        q_len=q_len,
        max_extend_len=q_len,
        max_seq_len=buf.width * page_size,  # a bound: the graphed decode sizes nothing by it
    )


class DecodeGraphs:
    """Captured decode forwards of ``model`` for each bucket up to ``max_bs``."""

    def __init__(self, model: Any, kv_cache: Any, max_bs: int, width: int, page_size: int, device: torch.device):
        self.model, self.kv_cache, self.page_size = model, kv_cache, page_size
        self.buckets = decode_buckets(max_bs)
        self.buffers = StaticDecodeBuffers(self.buckets[-1], width, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def bucket(self, n: int) -> int | None:
        return pick_bucket(n, self.buckets)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first so the smaller ones reuse its memory pool.

        The buffers hold padding only (null-page writes), so warm-up and capture touch no real KV.
        Every rank of a tensor-parallel group captures the same buckets in the same order (the
        collectives inside a graph must match).
        """
        t0 = time.perf_counter()
        empty = np.zeros(0, dtype=np.int64)
        pool = None
        side = torch.cuda.Stream()
        for bs in reversed(self.buckets):
            pad = decode_inputs(empty, np.zeros((0, 0), np.int32), self.page_size, self.buffers.width, pad_to=bs)
            self.buffers.load(pad, self.buffers.input_ids[:0])
            batch = self.buffers.batch(bs, self.page_size)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles Triton kernels, creates cuBLAS / NCCL state
                for _ in range(2):
                    self.model(batch, self.kv_cache)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(batch, self.kv_cache)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("CUDA graphs: captured decode batch sizes %s in %.1f s", self.buckets, time.perf_counter() - t0)

    def run(self, inputs: DecodeInputs, input_ids: torch.Tensor) -> torch.Tensor:
        """Replay the bucket of ``inputs`` (already padded to it): logits [num_real, vocab], a fresh fp32 tensor."""
        bs = inputs.batch_size
        graph = self.graphs.get(bs)
        if graph is None:
            raise ValueError(f"no decode graph for batch size {bs} (buckets {self.buckets})")
        self.buffers.load(inputs, input_ids)
        graph.replay()
        # a copy: the static output is overwritten by the next replay
        return self.outputs[bs][: inputs.num_real].to(torch.float32, copy=True)

    @torch.inference_mode()
    def run_eager(self, inputs: DecodeInputs, input_ids: torch.Tensor) -> torch.Tensor:
        """The same forward over the same static buffers, launched op by op (the bitwise reference)."""
        self.buffers.load(inputs, input_ids)
        out = self.model(self.buffers.batch(inputs.batch_size, self.page_size), self.kv_cache)
        return out[: inputs.num_real].to(torch.float32, copy=True)
