"""ForwardBatch construction and the paged KV write/gather."""

from __future__ import annotations

import pytest
import torch

from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch
from tokenspeed_engine.kv_cache import gather_paged_kv, write_paged_kv


def test_fields_of_a_chunk_over_a_prefix_and_a_prompt():
    b = build_forward_batch([SequenceInput(5, [10, 11, 12], [7, 3]), SequenceInput(0, [20, 21], [9])], page_size=4)
    assert b.mode is ForwardMode.EXTEND and b.batch_size == 2 and b.num_tokens == 5
    assert b.positions.tolist() == [5, 6, 7, 0, 1]
    assert b.seq_lens.tolist() == [8, 2] and b.extend_lens.tolist() == [3, 2] and b.prefix_lens.tolist() == [5, 0]
    assert b.cu_seqlens_q.tolist() == [0, 3, 5] and b.cu_seqlens_k.tolist() == [0, 8, 10]
    assert b.block_table.tolist() == [[7, 3], [9, 0]] and b.block_table.dtype == torch.int32
    # position 5 -> page 3 (logical page 1) offset 1 -> slot 13
    assert b.out_cache_loc.tolist() == [13, 14, 15, 36, 37]
    assert b.kv_slots.tolist() == [28, 29, 30, 31, 12, 13, 14, 15, 36, 37]
    assert b.last_token_indices().tolist() == [2, 4]
    assert (b.max_extend_len, b.max_seq_len) == (3, 8)


def test_decode_validation():
    b = build_forward_batch([SequenceInput(4, [1, 2], [1, 2]), SequenceInput(1, [3, 4], [5])], 4, ForwardMode.DECODE)
    assert b.q_len == 2 and b.is_decode
    with pytest.raises(ValueError, match="same number of new tokens"):
        build_forward_batch([SequenceInput(4, [1], [1, 2]), SequenceInput(1, [3, 4], [5])], 4, ForwardMode.DECODE)
    with pytest.raises(ValueError, match="null page"):
        build_forward_batch([SequenceInput(0, [1, 2], [0])], 4)
    with pytest.raises(ValueError, match="need 2 pages"):
        build_forward_batch([SequenceInput(3, [1, 2], [4])], 4)


def test_paged_write_then_gather_round_trips():
    cache = torch.zeros(6, 4, 3)
    slots = torch.tensor([21, 5, 6, 13])
    values = torch.arange(12.0).view(4, 3)
    write_paged_kv(cache, slots, values)
    assert torch.equal(cache[5, 1], values[0]) and torch.equal(cache[1, 1], values[1])
    assert torch.equal(gather_paged_kv(cache, slots), values)
    assert cache[0].abs().sum() == 0  # the null page is untouched


def test_kv_bytes_per_token_matches_the_allocated_cache(deepseek_ckpt, llama_ckpt):
    from tokenspeed_engine.models import load_model

    for _, path in (deepseek_ckpt, llama_ckpt):
        model = load_model(path, dtype=torch.bfloat16, device="cpu", progress=False)
        kv = model.make_kv_cache(num_pages=3, page_size=4)
        tensors = kv.layers if hasattr(kv, "layers") else kv.k + kv.v
        assert sum(t.numel() * t.element_size() for t in tensors) == 12 * model.kv_bytes_per_token()
