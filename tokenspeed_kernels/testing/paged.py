"""Paged latent-KV inputs for decode tests: random page order, poisoned unused memory.

Every page and slot a correct kernel must not read holds NaN (as do the pages that
unused block-table entries point at), so an out-of-range read shows up as NaN in
the output instead of passing silently.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    kv_cache: torch.Tensor  # [num_pages, page_size, dim]
    block_table: torch.Tensor  # int32 [batch, max_pages]
    cache_seqlens: torch.Tensor  # int32 [batch]
    page_size: int

    def dense(self, b: int) -> torch.Tensor:
        """Sequence b's tokens in order, [cache_seqlens[b], dim] (for references)."""
        n = int(self.cache_seqlens[b])
        pages = self.block_table[b, : -(-n // self.page_size)].long()
        return self.kv_cache[pages].reshape(-1, self.kv_cache.shape[-1])[:n]


def make_paged_kv(
    seqlens: list[int],
    page_size: int,
    dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    generator: torch.Generator | None = None,
    extra_pages: int = 3,
    extra_table_cols: int = 1,
    scale: float = 1.0,
) -> PagedKV:
    """Build a cache holding ``seqlens`` tokens per sequence with values ~ N(0, scale²).

    Pages are assigned in a random order; unused slots of last pages, spare pages and the
    pages that unused block-table entries point to are NaN. For float8 dtypes the values are
    generated in float32 and cast, and the NaN bytes alternate between e4m3fn's two NaN codes,
    0x7F and 0xFF (positive and negative), so a kernel that reads them cannot hide it.
    """
    pages_per_seq = [-(-n // page_size) for n in seqlens]
    used = sum(pages_per_seq)
    num_pages = used + extra_pages + 1  # +1: a poison page for unused table entries
    gen_dtype = torch.float32 if dtype.is_floating_point and dtype.itemsize == 1 else dtype
    kv = torch.full((num_pages, page_size, dim), float("nan"), dtype=gen_dtype, device=device)
    order = torch.randperm(num_pages - 1, generator=generator, device="cpu")[:used].tolist()
    poison = num_pages - 1
    max_pages = max(pages_per_seq, default=0) + extra_table_cols
    table = torch.full((len(seqlens), max(max_pages, 1)), poison, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(seqlens):
        for p in range(pages_per_seq[b]):
            page = order[cursor]
            cursor += 1
            table[b, p] = page
            filled = min(page_size, n - p * page_size)
            values = torch.randn(filled, dim, generator=generator, dtype=torch.float32) * scale
            kv[page, :filled] = values.to(gen_dtype).to(device)
    cache = kv.to(dtype)
    if cache.element_size() == 1:
        nan = torch.isnan(kv)
        odd = torch.arange(nan.numel(), device=nan.device).reshape(nan.shape) % 2 == 1
        cache.view(torch.uint8)[nan & odd] = 0xFF  # the cast gave 0x7F everywhere
    return PagedKV(
        kv_cache=cache,
        block_table=table.to(device),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device),
        page_size=page_size,
    )


def ragged_seqlens(gen: torch.Generator, q_len: int, page_size: int, n: int = 6) -> list[int]:
    """n sequence lengths: n - 1 drawn from the boundaries a paged decode kernel cares about (1,
    q_len, either side of a 64-key tile and of a page, a tail past three tiles) and one long random
    length (2000..2499); the draw follows `gen`."""
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    fixed = [1, q_len, 63, 64, 65, page_size - 1, page_size + 1, 3 * 64 + 17]
    return rng.sample(fixed, k=n - 1) + [2000 + rng.randrange(500)]
