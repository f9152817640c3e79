"""The Triton mla_decode backend against the fp64 reference.

CPU: the kernels run under the Triton interpreter in one subprocess (TRITON_INTERPRET must
be set before Triton decorates the kernels, and the GPU tests of this module need them
compiled), on fresh random inputs with NaN-poisoned unused pages and random page order.
The interpreter's tl.dot mishandles 16-bit floats, so there the kernel upcasts the tiles to
fp32 exactly (same products, fp32 accumulation); the tensor-core path is covered on the GPU.
GPU (``-m gpu``): every supported head count / q_len / page size, CUDA-graph replay, empty
sequences, many splits, fp8.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import replace
from functools import partial
from typing import Any

import pytest
import torch

from tokenspeed_kernels.reference import mla_decode_ref
from tokenspeed_kernels.testing import TOLERANCES, assert_close, compare, make_paged_kv
from tokenspeed_kernels.testing.graphs import capture_graph
from tokenspeed_kernels.testing.interpreter import interpret_main, run_in_interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALE = 192**-0.5  # DeepSeek's qk_head_dim ** -0.5

# id: (dtype, q_len, heads, page_size, num_splits or None = heuristic, causal, dim, dim_v, seqlens or None = random)
CPU_CASES: dict[str, tuple[Any, ...]] = {
    "bf16-q1-h16-p64-auto": ("bfloat16", 1, 16, 64, None, True, 576, 512, None),
    "bf16-q2-h16-p16-s3": ("bfloat16", 2, 16, 16, 3, True, 576, 512, None),
    "fp16-q3-h8-p32-s5": ("float16", 3, 8, 32, 5, True, 576, 512, None),
    "bf16-q4-h16-p128-s1": ("bfloat16", 4, 16, 128, 1, True, 576, 512, None),
    "fp32-q4-h4-p16-s4": ("float32", 4, 4, 16, 4, True, 576, 512, None),
    "fp32-q2-h3-p16-generic-dims": ("float32", 2, 3, 16, 2, True, 80, 64, None),
    "bf16-q2-h16-p32-noncausal": ("bfloat16", 2, 16, 32, 2, False, 576, 512, None),
    "bf16-q4-h2-p16-no-keys": ("bfloat16", 4, 2, 16, 2, True, 576, 512, [2, 0, 1, 9]),
    "bf16-q4-h2-p16-no-keys-s1": ("bfloat16", 4, 2, 16, 1, True, 576, 512, [3, 0]),
    "fp8-q2-h16-p16-s3": ("float8_e4m3fn", 2, 16, 16, 3, True, 576, 512, None),
}


def random_seqlens(rng: random.Random, q_len: int, page: int, batch: int = 3, top: int = 300) -> list[int]:
    """Ragged lengths with a 1 (or q_len), a non-multiple of the page and a random one."""
    picks = [max(1, q_len - 1), page * rng.randrange(1, 4) + rng.randrange(1, page), rng.randrange(q_len, top)]
    return rng.sample(picks, len(picks))[:batch]


def run_case(case: tuple[Any, ...], seed: int, device: str = "cpu", min_chunk: int | None = 16) -> dict[str, Any]:
    """Build inputs, run the Triton kernel and the fp64 reference; return the comparisons.

    ``min_chunk`` overrides the config's smallest split (tokens), so that short test
    sequences still spread over several splits; None keeps the tuned value.
    """
    from tokenspeed_kernels.triton.mla_decode import default_config, mla_decode_with_config

    dtype_name, q_len, heads, page, splits, causal, dim, dim_v, seqlens = case
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seqlens = seqlens or random_seqlens(rng, q_len, page)
    paged = make_paged_kv(seqlens, page, dim, dtype, device, generator=gen)
    q_dtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
    q = torch.randn(len(seqlens), q_len, heads, dim, generator=gen).to(q_dtype).to(device)
    kv_scale = torch.tensor([0.7], device=device) if dtype == torch.float8_e4m3fn else None
    args = (paged.block_table, paged.cache_seqlens, SCALE, causal, dim_v)
    cfg = default_config(q_len * heads, dtype)
    cfg = replace(cfg, min_split_tokens=min_chunk) if min_chunk else cfg
    out, lse = mla_decode_with_config(q, paged.kv_cache, *args, kv_scale, config=cfg, num_splits=splits)
    kv64 = paged.kv_cache.double() * (0.7 if kv_scale is not None else 1.0)
    ref_out, ref_lse = mla_decode_ref(q.double(), kv64, *args)
    c_out = compare(out, ref_out, TOLERANCES["attention"][dtype])
    c_lse = compare(lse, ref_lse, TOLERANCES["lse"][dtype])
    return {
        "ok": c_out.ok and c_lse.ok and out.dtype == q_dtype and lse.dtype == torch.float32,
        "report": f"seed={seed} seqlens={seqlens}: " + c_out.report("out") + "; " + c_lse.report("lse"),
    }


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, Any]]:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case_id", list(CPU_CASES))
def test_interpreter_matches_fp64_reference(case_id: str, interpreter_results: dict[str, dict[str, Any]]) -> None:
    result = interpreter_results[case_id]
    assert result["ok"], result["report"]


def test_registration_traits() -> None:
    from tokenspeed_kernels import registry
    from tokenspeed_kernels.registry import A100, CPU, H100, DeviceInfo
    from tokenspeed_kernels.triton import register_triton_kernels

    had = any(k.backend == "triton" for k in registry.kernels("mla_decode"))
    register_triton_kernels()
    try:
        with registry.use_backend("triton", "mla_decode"):
            for dev in (H100, A100):
                k = registry.select("mla_decode", dev, torch.bfloat16, page_size=64, q_len=8, head_dim=576)
                assert k.backend == "triton" and isinstance(k.impl, str)
            for bad in ({"page_size": 8}, {"q_len": 9}, {"head_dim": 192}):
                with pytest.raises(registry.NoKernelError):
                    registry.select("mla_decode", H100, torch.bfloat16, **bad)
            with pytest.raises(registry.NoKernelError):
                registry.select("mla_decode", H100, torch.float32)
            for dev in (CPU, DeviceInfo("nvidia", (7, 5), "T4 (fake)")):
                with pytest.raises(registry.NoKernelError):
                    registry.select("mla_decode", dev, torch.bfloat16)
    finally:
        if not had:
            registry.unregister("mla_decode", "triton")


# ----------------------------------------------------------------------------------- GPU
GPU_GRID = [(h, ql, 64) for h in (16, 32, 64, 128) for ql in (1, 2, 3, 4, 8)] + [
    (h, ql, p) for p in (16, 32, 128) for h, ql in ((16, 1), (128, 2), (32, 4), (64, 8))
]


@pytest.mark.gpu
@pytest.mark.parametrize("heads,q_len,page", GPU_GRID)
def test_gpu_matches_fp64_reference(heads: int, q_len: int, page: int, gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    seqlens = [1, q_len, page * rng.randrange(3, 12) + rng.randrange(1, page), rng.randrange(page, 2500)]
    dtype = torch.float16 if (heads + q_len + page) % 5 == 0 else torch.bfloat16  # fp16 on a spread subset
    paged = make_paged_kv(seqlens, page, 576, dtype, "cuda", generator=gen)
    q = torch.randn(len(seqlens), q_len, heads, 576, generator=gen).to(dtype).cuda()
    from tokenspeed_kernels.triton.mla_decode import mla_decode

    args = (paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, True, 512)
    out, lse = mla_decode(q, *args)
    ref_out, ref_lse = mla_decode_ref(q.double(), paged.kv_cache.double(), *args[1:])
    assert out.shape == (4, q_len, heads, 512) and out.dtype == dtype
    assert_close(out, ref_out, "attention", dtype, f"out seqlens={seqlens}")
    assert_close(lse, ref_lse, "lse", dtype, f"lse seqlens={seqlens}")


@pytest.mark.gpu
@pytest.mark.parametrize("splits,min_chunk", [(None, None), (1, None), (7, None), (7, 32)])
def test_gpu_empty_sequence_and_short_rows(splits: int | None, min_chunk: int | None, gen: torch.Generator) -> None:
    from tokenspeed_kernels.triton.mla_decode import default_config, mla_decode_with_config

    seqlens = [0, 700, 1, 0, 3]
    paged = make_paged_kv(seqlens, 64, 576, torch.bfloat16, "cuda", generator=gen)
    q = torch.randn(5, 4, 16, 576, generator=gen).to(torch.bfloat16).cuda()
    args = (paged.block_table, paged.cache_seqlens, SCALE, True, 512)
    cfg = default_config(64, torch.bfloat16)
    cfg = replace(cfg, min_split_tokens=min_chunk) if min_chunk else cfg
    out, lse = mla_decode_with_config(q, paged.kv_cache, *args, config=cfg, num_splits=splits)
    for b in (0, 3):
        assert (out[b] == 0).all() and torch.isneginf(lse[b]).all()
    assert (out[2, :3] == 0).all() and torch.isneginf(lse[2, :3]).all()  # length 1 < q_len 4
    ref_out, ref_lse = mla_decode_ref(q.double(), paged.kv_cache.double(), *args)
    assert_close(out, ref_out, "attention", torch.bfloat16)
    assert_close(lse, ref_lse, "lse", torch.bfloat16, "lse")


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,heads", [(1, 16), (4, 16), (2, 128)])
def test_gpu_long_sequences_many_splits(q_len: int, heads: int, gen: torch.Generator) -> None:
    from tokenspeed_kernels.triton.mla_decode import mla_decode

    seqlens = [33000, 17] if heads == 16 else [9000]
    paged = make_paged_kv(seqlens, 64, 576, torch.bfloat16, "cuda", generator=gen)
    q = torch.randn(len(seqlens), q_len, heads, 576, generator=gen).to(torch.bfloat16).cuda()
    args = (paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, True, 512)
    out, lse = mla_decode(q, *args)
    ref_out, ref_lse = mla_decode_ref(q.double(), paged.kv_cache.double(), *args[1:])
    assert_close(out, ref_out, "attention", torch.bfloat16)
    assert_close(lse, ref_lse, "lse", torch.bfloat16, "lse")


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager_bitwise(gen: torch.Generator) -> None:
    """Lengths change between capture and replay: the split ranges must come from the device."""
    from tokenspeed_kernels.triton.mla_decode import mla_decode

    paged = make_paged_kv([3000, 900, 4100, 5], 64, 576, torch.bfloat16, "cuda", generator=gen)
    q = torch.randn(4, 2, 16, 576, generator=gen).to(torch.bfloat16).cuda()
    args = (paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, True, 512)
    eager_before = mla_decode(q, *args)
    graph, captured = capture_graph(lambda: mla_decode(q, *args))
    paged.cache_seqlens.copy_(torch.tensor([1500, 850, 64, 2], dtype=torch.int32))  # within each one's pages
    q.copy_(torch.randn(4, 2, 16, 576, generator=gen).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    fresh = mla_decode(q, *args)
    assert torch.equal(captured[0], fresh[0]) and torch.equal(captured[1], fresh[1])
    assert not torch.equal(captured[0], eager_before[0])
    ref_out, _ = mla_decode_ref(q.double(), paged.kv_cache.double(), *args[1:])
    assert_close(captured[0], ref_out, "attention", torch.bfloat16, "replayed out")


@pytest.mark.gpu
def test_gpu_fp8_cache_matches_dequantised(gen: torch.Generator) -> None:
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    result = run_case(("float8_e4m3fn", 2, 32, 64, None, True, 576, 512, [1, 130, 2000]), seed, "cuda", None)
    assert result["ok"], result["report"]


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    interpret_main({cid: partial(run_case, case) for cid, case in CPU_CASES.items()}, int(sys.argv[2]))
