"""Device-side token permutation for the grouped MoE GEMMs (no host sync, graph-capturable).

The T * top_k (token, slot) pairs are numbered ``slot = t * top_k + j``. ``moe_align`` sorts
them by local expert (stable: token order within an expert), drops the ids outside
``[expert_offset, expert_offset + num_experts)`` and pads each expert's run to a multiple of
the GEMM tile ``block_m``, so that every M tile of the GEMMs belongs to exactly one expert.

All output sizes come from shapes only. The padded length is at most
``sum_e ceil(c_e / block_m) * block_m`` with ``sum_e c_e <= T * top_k``, i.e. at most
``cdiv(T * top_k, block_m) + min(E, T * top_k)`` tiles: far fewer than the generic
``T * top_k + E * (block_m - 1)`` rows at decode (1 token, top-8, 256 experts: 9 tiles, not 241).
Tiles past the used ones are marked with expert -1 and their GEMM programs exit at once.

Written with torch ops (a stable sort, a scatter-add histogram, cumsum, searchsorted): each
runs on the device without reading a value back, so the whole step is capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoeAlignment:
    sorted_slots: torch.Tensor  # int32 [num_tiles * block_m]: slot ids grouped by expert; padding = T * top_k
    tile_expert: torch.Tensor  # int32 [num_tiles]: local expert of each M tile, -1 for unused tiles
    padded_rows: torch.Tensor  # int32 [1]: rows in use (a multiple of block_m)
    num_slots: int  # T * top_k: the padding sentinel and the bound for a valid slot id
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tile_expert.numel()


def max_tiles(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the M tiles any routing of ``num_slots`` pairs onto ``num_experts`` needs."""
    generic = -(-(num_slots + num_experts * (block_m - 1)) // block_m)
    return max(1, min(generic, -(-num_slots // block_m) + min(num_experts, num_slots)))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_offset: int = 0) -> MoeAlignment:
    """Sort (token, slot) pairs of ``topk_ids [T, top_k]`` by local expert, padded to ``block_m``."""
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align: topk_ids must be [tokens, top_k], got {tuple(topk_ids.shape)}")
    device = topk_ids.device
    num_slots = topk_ids.numel()
    tiles = max_tiles(num_slots, num_experts, block_m)
    local = topk_ids.reshape(-1).to(torch.int64) - expert_offset
    valid = (local >= 0) & (local < num_experts)
    key = torch.where(valid, local, num_experts)  # bucket E collects other ranks' pairs, sorted last
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(counts, 0) - counts  # first sorted position of each expert (unpadded)
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded

    sorted_key, order = torch.sort(key, stable=True)
    in_range = sorted_key < num_experts
    e = sorted_key.clamp(max=num_experts - 1)
    rank = torch.arange(num_slots, device=device) - start[e]
    trash = tiles * block_m  # one extra row absorbs the dropped pairs' writes
    dest = torch.where(in_range, padded_start[e] + rank, trash)
    sorted_slots = torch.full((trash + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))

    tile_start = torch.arange(tiles, device=device) * block_m
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    total = padded_end[-1:] if num_experts else torch.zeros(1, dtype=torch.int64, device=device)
    return MoeAlignment(sorted_slots[:trash], tile_expert, total.to(torch.int32), num_slots, block_m)
