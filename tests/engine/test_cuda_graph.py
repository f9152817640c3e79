"""Decode CUDA graphs: buckets, padding and static buffers on the CPU; capture and replay on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.tiny_models import VOCAB, engine_for, run_engine, runner_for, tiny_deepseek
from tokenspeed_engine.cuda_graph import (
    StaticDecodeBuffers,
    decode_buckets,
    decode_forward_batch,
    decode_inputs,
    graphs_supported,
    pick_bucket,
)
from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch
from tokenspeed_engine.sampling import SamplingParams

PAGE = 4
WIDTH = 12  # block-table width: 48 tokens


def test_buckets_cover_every_batch_size_with_bounded_padding() -> None:
    assert decode_buckets(1) == [1]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert decode_buckets(16) == [1, 2, 4, 8, 16]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_buckets(70) == [1, 2, 4, 8, 16, 32, 48, 64, 70]
    for max_bs in (1, 3, 16, 37, 160):
        buckets = decode_buckets(max_bs)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_bs
        for n in range(1, max_bs + 1):
            b = pick_bucket(n, buckets)
            assert b is not None and n <= b and (b - n < 16 and b <= 2 * n or b == max_bs)
        assert pick_bucket(max_bs + 1, buckets) is None
    with pytest.raises(ValueError, match="cuda_graph_max_bs must be >= 1"):
        decode_buckets(0)


def random_decodes(rng: np.random.Generator, n: int, width: int = WIDTH, page: int = PAGE):
    """n sequences with random cached lengths and distinct random pages (never page 0)."""
    prefix = rng.integers(1, width * page - 1, size=n)
    pages = np.zeros((n, width), dtype=np.int32)
    perm = rng.permutation(np.arange(1, n * width + 1)).reshape(n, width)
    for b in range(n):
        used = prefix[b] // page + 1
        pages[b, :used] = perm[b, :used]
    return prefix, pages


@pytest.mark.parametrize("n,pad_to", [(1, None), (5, None), (5, 8), (13, 16)])
def test_decode_inputs_match_build_forward_batch(n, pad_to) -> None:
    rng = np.random.default_rng(n * 31 + (pad_to or 0))
    prefix, pages = random_decodes(rng, n)
    narrow = pages[:, : int((prefix // PAGE + 1).max())]  # what a step hands over: only the pages in use
    inputs = decode_inputs(prefix, narrow, PAGE, WIDTH, pad_to)
    seqs = [SequenceInput(int(p), [7], pages[b].tolist()) for b, p in enumerate(prefix)]
    ref = build_forward_batch(seqs, PAGE, ForwardMode.DECODE)
    bs = pad_to or n
    assert inputs.batch_size == bs and inputs.num_real == n
    assert inputs.positions[:n].tolist() == ref.positions.tolist()
    assert inputs.seq_lens[:n].tolist() == ref.seq_lens.tolist()
    assert inputs.out_cache_loc[:n].tolist() == ref.out_cache_loc.tolist()
    assert inputs.block_table.shape == (bs, WIDTH)
    assert (inputs.block_table[:n] == ref.block_table.numpy()).all()  # full width, zeros past the used pages
    # padding: seq_len 1 over the null page, writing the null page's slot 0, position 0
    assert (inputs.seq_lens[n:] == 1).all() and (inputs.block_table[n:] == 0).all()
    assert (inputs.out_cache_loc[n:] == 0).all() and (inputs.positions[n:] == 0).all()
    eager = decode_forward_batch(decode_inputs(prefix, narrow, PAGE, WIDTH), torch.full((n,), 7), PAGE, "cpu")
    for name in (
        "positions",
        "seq_lens",
        "extend_lens",
        "prefix_lens",
        "cu_seqlens_q",
        "cu_seqlens_k",
        "out_cache_loc",
        "kv_slots",
        "input_ids",
    ):
        assert getattr(eager, name).tolist() == getattr(ref, name).tolist(), name
    assert eager.block_table.shape[1] == WIDTH and eager.max_seq_len == ref.max_seq_len and eager.is_decode
    lean = decode_forward_batch(decode_inputs(prefix, narrow, PAGE, WIDTH), torch.full((n,), 7), PAGE, "cpu", kv_slots=False)
    assert lean.kv_slots.numel() == 0 and lean.out_cache_loc.tolist() == ref.out_cache_loc.tolist()


def test_decode_inputs_reject_bad_tables() -> None:
    with pytest.raises(ValueError, match="need 2 pages"):
        decode_inputs(np.array([4]), np.array([[3]]), PAGE, WIDTH)
    with pytest.raises(ValueError, match="null page"):
        decode_inputs(np.array([2, 5]), np.array([[3, 0], [0, 4]]), PAGE, WIDTH)
    with pytest.raises(ValueError, match="smaller than the batch"):
        decode_inputs(np.array([1, 1, 1]), np.ones((3, 1), np.int32), PAGE, WIDTH, pad_to=2)
    with pytest.raises(ValueError, match="pages must be"):
        decode_inputs(np.array([1]), np.ones((1, WIDTH + 1), np.int32), PAGE, WIDTH)


def test_static_buffers_reset_the_rows_a_smaller_batch_pads() -> None:
    rng = np.random.default_rng(0)
    buf = StaticDecodeBuffers(16, WIDTH, torch.device("cpu"))
    prefix, pages = random_decodes(rng, 11)
    buf.load(decode_inputs(prefix, pages, PAGE, WIDTH, 16), torch.arange(11) + 100)
    prefix, pages = random_decodes(rng, 3)
    small = decode_inputs(prefix, pages, PAGE, WIDTH, 4)
    buf.load(small, torch.tensor([5, 6, 7]))
    b = buf.batch(4, PAGE)
    ref = decode_forward_batch(small, torch.tensor([5, 6, 7, 0]), PAGE, "cpu")
    for name in (
        "input_ids",
        "positions",
        "seq_lens",
        "prefix_lens",
        "cu_seqlens_q",
        "cu_seqlens_k",
        "out_cache_loc",
        "block_table",
        "extend_lens",
    ):
        assert getattr(b, name).tolist() == getattr(ref, name).tolist(), name
    assert b.input_ids.data_ptr() == buf.input_ids.data_ptr()  # views of the static storage, not copies
    with pytest.raises(ValueError, match="does not fit"):
        buf.load(decode_inputs(*random_decodes(rng, 3), PAGE, WIDTH, 32), torch.zeros(3, dtype=torch.int64))


@torch.no_grad()
def test_padded_static_batch_computes_the_real_rows_like_eager() -> None:
    """The model over a padded static batch (what a graph replays) gives the real rows' eager logits,
    and padding writes only the null page."""
    model = tiny_deepseek(torch.float64)
    rng = np.random.default_rng(1)
    kv = model.make_kv_cache(64, PAGE)
    g = torch.Generator().manual_seed(1)
    for layer in kv.layers:
        layer.normal_(generator=g)  # cached tokens: random latents
    prefix, pages = random_decodes(rng, 5, width=WIDTH)
    ids = torch.from_numpy(rng.integers(1, VOCAB, size=5))
    before = [layer.clone() for layer in kv.layers]
    buf = StaticDecodeBuffers(8, WIDTH, torch.device("cpu"))
    padded_inputs = decode_inputs(prefix, pages, PAGE, WIDTH, 8)
    buf.load(padded_inputs, ids)
    padded = model(buf.batch(8, PAGE), kv)
    eager = model(decode_forward_batch(decode_inputs(prefix, pages, PAGE, WIDTH), ids, PAGE, "cpu"), kv)
    # fp64 except the router, which computes in fp32 as HF does: fp32-level agreement
    torch.testing.assert_close(padded[:5], eager, rtol=1e-5, atol=1e-6)
    # padding rows write only the null page: the changed slots are the real rows' and page 0's
    allowed = set(padded_inputs.out_cache_loc[:5].tolist()) | set(range(PAGE))
    for old, new in zip(before, kv.layers, strict=True):
        changed = (old.flatten(0, 1) != new.flatten(0, 1)).any(-1).nonzero().flatten().tolist()
        assert set(changed) <= allowed and set(padded_inputs.out_cache_loc[:5].tolist()) <= set(changed)


def test_graphs_are_only_for_cuda_and_static_decode_shapes() -> None:
    from tests.models.utils import tiny_llama_hf_config
    from tokenspeed_engine.models import build_model, config_from_hf

    ds = tiny_deepseek()
    assert graphs_supported(ds, torch.device("cpu")) == (False, "device is cpu")
    assert graphs_supported(ds, torch.device("cuda"))[0]
    llama = build_model(
        config_from_hf(tiny_llama_hf_config().to_dict() | {"architectures": ["LlamaForCausalLM"]}),
        dtype=torch.float32,
        device="cpu",
    )
    ok, why = graphs_supported(llama, torch.device("cuda"))
    assert not ok and "length-dependent" in why
    assert runner_for(ds, cuda_graph_max_bs=8).graphs is None  # on the CPU the runner stays eager


@pytest.mark.gpu
def test_graph_replay_equals_eager_on_the_gpu() -> None:
    model = tiny_deepseek(
        torch.bfloat16,
        "cuda",
        hidden_size=128,
        num_attention_heads=16,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        n_routed_experts=16,
    )
    graph = runner_for(model, device="cuda", page_size=16, max_model_len=512, cuda_graph_max_bs=8)
    eager = runner_for(model, device="cuda", page_size=16, max_model_len=512)
    assert graph.graphs is not None and graph.graphs.buckets == [1, 2, 4, 8]
    prompts = [torch.randint(1, VOCAB, (17,)).tolist() for _ in range(4)]  # 4 = a bucket: same launches both ways
    outs = {}
    for name, runner in (("graph", graph), ("eager", eager)):
        e = engine_for(runner, overlap=True, batched_tokens=256)
        for rid, prompt in enumerate(prompts):
            e.add_request(rid, prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        outs[name] = {r: sum((o.token_ids for o in v), []) for r, v in run_engine(e).items()}
    assert outs["graph"] == outs["eager"]
    # bit for bit over the same static buffers, at a padded size (3 of 4)
    rng = np.random.default_rng(2)
    prefix, pages = random_decodes(rng, 3, width=graph.max_pages, page=16)
    inputs = decode_inputs(prefix, pages, 16, graph.max_pages, 4)
    ids = torch.randint(1, VOCAB, (3,), device="cuda")
    torch.testing.assert_close(graph.graphs.run(inputs, ids), graph.graphs.run_eager(inputs, ids), rtol=0, atol=0)
