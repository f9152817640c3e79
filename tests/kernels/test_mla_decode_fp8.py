"""mla_decode over an fp8 (e4m3fn) latent cache with a per-tensor kv_scale.

Oracle: the fp64 reference over the dequantised cache (``codes * kv_scale``), within the fp8
rows of the tolerance table. Unused pages and slots hold e4m3fn NaN bytes (0x7F / 0xFF), pages
come in random order. CPU: the C++ op (all sizes) and the Triton fp8 kernel under the Triton
interpreter (one subprocess; the interpreter's tl.dot mishandles 16-bit floats, so there the
kernel upcasts its fp16 tiles to fp32 exactly). GPU (``-m gpu``): DeepSeek shapes, long
sequences, CUDA-graph replay, and every kernel variant the benchmark sweeps.
"""

from __future__ import annotations

import random
import sys
from functools import partial
from typing import Any

import pytest
import torch

import tokenspeed_kernels as tk
from tokenspeed_kernels.reference import mla_decode_ref
from tokenspeed_kernels.testing import TOLERANCES, assert_close, compare, make_paged_kv
from tokenspeed_kernels.testing.graphs import capture_graph
from tokenspeed_kernels.testing.interpreter import interpret_main, run_in_interpreter

F8 = torch.float8_e4m3fn
SCALE = 192**-0.5  # DeepSeek's qk_head_dim ** -0.5


def fp8_inputs(seqlens: list[int], q_len: int, heads: int, page: int, dim: int, gen: torch.Generator,
               q_dtype: torch.dtype = torch.bfloat16, device: str = "cpu", q_mag: float = 1.0):  # fmt: skip
    paged = make_paged_kv(seqlens, page, dim, F8, device, generator=gen)
    q = (torch.randn(len(seqlens), q_len, heads, dim, generator=gen) * q_mag).to(q_dtype).to(device)
    kv_scale = torch.tensor([float(torch.empty(1).uniform_(0.02, 3.0, generator=gen))], device=device)
    return paged, q, kv_scale


def reference(q, paged, kv_scale, causal=True, dv=512):
    """fp64 attention over the dequantised cache, on the CPU (inputs may live on the GPU)."""
    deq = paged.kv_cache.cpu().double() * kv_scale.cpu().double()  # NaN bytes stay NaN; never read
    return mla_decode_ref(q.cpu().double(), deq, paged.block_table.cpu(), paged.cache_seqlens.cpu(), SCALE, causal, dv)


def test_nan_bytes_poison_unused_memory(gen: torch.Generator) -> None:
    paged = make_paged_kv([5, 17], 8, 16, F8, generator=gen)
    raw = paged.kv_cache.view(torch.uint8)
    assert (raw == 0x7F).any() and (raw == 0xFF).any()
    assert torch.isnan(paged.kv_cache.float()[raw == 0xFF]).all()


@pytest.mark.parametrize("q_len,heads,page,dim,dv", [(1, 16, 64, 576, 512), (2, 128, 64, 576, 512), (4, 16, 16, 576, 512),
                                                    (3, 3, 16, 80, 64), (1, 5, 7, 40, 24)])  # fmt: skip
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_op_matches_fp64_on_dequantised_cache(q_len, heads, page, dim, dv, causal, gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    seqlens = [q_len, page * rng.randrange(1, 5) + rng.randrange(1, page + 1), rng.randrange(q_len, 300)]
    for q_dtype in (torch.bfloat16, torch.float32):
        paged, q, kv_scale = fp8_inputs(seqlens, q_len, heads, page, dim, gen, q_dtype)
        out, lse = tk.mla_decode(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, causal, dv, kv_scale)
        assert out.dtype == q_dtype and out.shape == (3, q_len, heads, dv) and lse.dtype == torch.float32
        ref_out, ref_lse = reference(q, paged, kv_scale, causal, dv)
        c = assert_close(out, ref_out, "attention", F8, f"out seqlens={seqlens} q={q_dtype}")
        assert_close(lse, ref_lse, "lse", F8, f"lse seqlens={seqlens} q={q_dtype}")
        if q_dtype == torch.float32:  # dequantise + attend in fp32: fp32-level agreement overall
            assert c.rel_error < 1e-5, c.report("fp32 q")


def test_python_reference_dequantises_like_the_op(gen: torch.Generator) -> None:
    paged, q, kv_scale = fp8_inputs([33, 2], 2, 4, 8, 40, gen, torch.float32)
    args = (paged.block_table, paged.cache_seqlens, 0.2, True, 32)
    a = mla_decode_ref(q, paged.kv_cache, *args, kv_scale=kv_scale)
    b = tk.mla_decode(q, paged.kv_cache, *args, kv_scale)
    assert_close(a[0], b[0], "attention", torch.float32)
    assert_close(a[1], b[1], "lse", torch.float32, "lse")


def test_quantise_on_store_then_decode_tracks_the_unquantised_cache(gen: torch.Generator) -> None:
    """The engine's path: bf16 latents -> kv_cache_write (fp8) -> mla_decode, against fp64 attention on
    the original latents. The gap is the quantisation (about 4% here), well inside its bound."""
    heads, q_len, page = 16, 2, 64
    seqlens = [700, 64, 1]
    dense = make_paged_kv(seqlens, page, 576, torch.float32, generator=gen)
    latents = torch.nan_to_num(dense.kv_cache).to(torch.bfloat16)
    cache = torch.zeros(dense.kv_cache.shape, dtype=F8)
    kv_scale = torch.tensor([0.5])
    slots = torch.arange(latents.shape[0] * page)
    tk.ops.kv_cache_write(cache, slots, latents.view(-1, 576), kv_scale)
    q = torch.randn(3, q_len, heads, 576, generator=gen).to(torch.bfloat16)
    args = (dense.block_table, dense.cache_seqlens, SCALE, True, 512)
    out, lse = tk.mla_decode(q, cache, *args, kv_scale)
    ref_out, ref_lse = mla_decode_ref(q.double(), latents.double(), *args)
    result = assert_close(out, ref_out, "attention_fp8_quantised", F8, "fp8 cache vs unquantised")
    assert result.rel_error > 1e-3, "the fp8 cache should differ from the unquantised one (was it quantised?)"
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and (lse - ref_lse)[seen].abs().max() < 0.2


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(kv_scale=None), r"kv_scale \(float32 \[1\]\) is required"),
        (dict(kv_scale=torch.tensor([1.0], dtype=torch.float64)), r"kv_scale must be Float, got Double"),
        (dict(kv_scale=torch.ones(2)), r"kv_scale must hold one per-tensor scale, got 2 values"),
        (dict(q=torch.randn(2, 1, 4, 40, dtype=torch.float64)), r"q must be bfloat16/half/float with an fp8 kv_cache"),
        (dict(kv_cache="e5m2"), r"kv_cache dtype \(Float8_e5m2\) must equal q dtype \(BFloat16\) or be float8_e4m3fn"),
    ],
)
def test_cpu_op_bad_fp8_input(change: dict[str, Any], pattern: str, gen: torch.Generator) -> None:
    paged, q, kv_scale = fp8_inputs([10, 3], 1, 4, 8, 40, gen)
    args = dict(q=q, kv_cache=paged.kv_cache, block_table=paged.block_table, cache_seqlens=paged.cache_seqlens,
                softmax_scale=0.1, causal=True, head_dim_v=32, kv_scale=kv_scale)  # fmt: skip
    if change.get("kv_cache") == "e5m2":
        change = dict(kv_cache=paged.kv_cache.float().nan_to_num().to(torch.float8_e5m2))
    args.update(change)
    with pytest.raises(RuntimeError, match=pattern):
        tk.mla_decode(**args)


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(kv_scale=None), r"kv_scale \(float32 \[1\]\) is required"),
        (dict(kv_scale=torch.tensor([1.0], dtype=torch.float16)), r"kv_scale must be float32, got torch.float16"),
        (dict(kv_scale=torch.ones(1, 2)), r"kv_scale must hold one per-tensor scale, got shape \(1, 2\)"),
        (dict(q=torch.randn(2, 1, 4, 576, dtype=torch.float64)), r"q must be bfloat16/float16"),
        (dict(kv_cache=torch.zeros(4, 16, 576, dtype=torch.float8_e5m2)), r"kv_cache must be torch.float8_e4m3fn"),
        (dict(head_dim_v=500), r"head_dim_v = 500 must be a power of two"),
        (dict(kv_cache=torch.zeros(4, 12, 576, dtype=F8)), r"page_size \(kv_cache.shape\[1\]\) = 12"),
        (dict(kv_cache=torch.zeros(4, 16, 512, dtype=F8)), r"kv_cache.shape\[2\] \(512\) must equal q.shape\[3\] \(576\)"),
        (dict(block_table=torch.zeros(2, 3, dtype=torch.int64)), r"block_table must be torch.int32"),
        (dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), r"cache_seqlens must be \[batch=2\]"),
    ],
)
def test_triton_fp8_bad_input(change: dict[str, Any], pattern: str) -> None:
    from tokenspeed_kernels.triton.mla_decode_fp8 import check_fp8_args

    args = dict(q=torch.randn(2, 1, 4, 576).to(torch.bfloat16), kv_cache=torch.zeros(4, 16, 576, dtype=F8),
                block_table=torch.zeros(2, 3, dtype=torch.int32), cache_seqlens=torch.zeros(2, dtype=torch.int32),
                head_dim_v=512, kv_scale=torch.ones(1))  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=pattern):
        check_fp8_args(**args)


def test_opcheck_fp8_cache(gen: torch.Generator) -> None:
    paged, q, kv_scale = fp8_inputs([9, 20], 2, 4, 8, 40, gen)
    args = (q, paged.kv_cache, paged.block_table, paged.cache_seqlens, 0.1, True, 32, kv_scale)
    # opcheck's schema test multiplies inputs, which torch lacks for fp8: the fp8 call checks the
    # fake and dispatch paths (the schema is shared with the bf16 cache, checked in test_op_compile)
    torch.library.opcheck(torch.ops.tokenspeed.mla_decode.default, args,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip


def test_registry_routes_fp8_caches() -> None:
    """Hopper: the sm90 kernel (tests/kernels/test_mla_decode_sm90_fp8.py) when built with CUDA, else
    Triton; other GPUs: Triton; CPU: the C++ op."""
    from tokenspeed_kernels import registry

    traits = dict(page_size=64, heads=16, q_len=1, head_dim=576)
    hopper = registry.select("mla_decode", registry.H100, torch.bfloat16, kv_dtype=F8, **traits).backend
    assert hopper == ("cuda_sm90" if tk.build_info()["cuda"] else "triton")
    assert registry.select("mla_decode", registry.A100, torch.bfloat16, kv_dtype=F8, **traits).backend == "triton"
    assert registry.select("mla_decode", "cpu", torch.bfloat16, kv_dtype=F8, **traits).backend == "native_cpu"
    with pytest.raises(registry.NoKernelError):  # the sm90 kernel takes bf16 queries only
        with registry.use_backend("cuda_sm90", "mla_decode"):
            registry.select("mla_decode", registry.H100, torch.float16, kv_dtype=F8, **traits)


# -------------------------------------------------------------- Triton fp8 kernel, interpreter
# id: (q_len, heads, page, num_splits or None, causal, dim, dim_v, seqlens or None, q magnitude, config overrides)
CASES: dict[str, tuple[Any, ...]] = {
    "q1-h16-p64-default": (1, 16, 64, None, True, 576, 512, None, 1.0, {}),
    "q2-h16-p16-s3": (2, 16, 16, 3, True, 576, 512, None, 1.0, {}),
    "q4-h8-p32-s4-32rows": (4, 8, 32, 4, True, 576, 512, None, 1.0, {}),
    "q3-h3-p16-odd-dims": (3, 3, 16, 2, True, 80, 64, None, 1.0, {}),
    "q2-h16-p32-noncausal": (2, 16, 32, 2, False, 576, 512, None, 1.0, {}),
    "q4-h2-p16-no-keys": (4, 2, 16, 2, True, 576, 512, [2, 0, 1, 9], 1.0, {}),
    "q1-h16-p16-large-q": (1, 16, 16, 3, True, 576, 512, None, 3e4, {}),
    "q1-h16-p16-tiny-q": (1, 16, 16, 2, True, 576, 512, None, 1e-5, {}),
    "q1-h16-p16-no-prefetch": (1, 16, 16, 3, True, 576, 512, None, 1.0, {"prefetch": False}),
    "q2-h16-p16-bf16-dots": (2, 16, 16, 3, True, 576, 512, None, 1.0, {"dot_fp16": False}),
    "q2-h16-p64-32rows-prefetch": (2, 16, 64, 2, True, 576, 512, None, 1.0, {"block_h": 32, "prefetch": True}),
}


def run_case(case: tuple[Any, ...], seed: int, device: str = "cpu", min_chunk: int | None = 16) -> dict[str, Any]:
    from dataclasses import replace

    from tokenspeed_kernels.triton.mla_decode_fp8 import default_fp8_config, mla_decode_fp8_with_config

    q_len, heads, page, splits, causal, dim, dv, seqlens, q_mag, overrides = case
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seqlens = seqlens or [max(1, q_len - 1), page * rng.randrange(1, 4) + rng.randrange(1, page), rng.randrange(q_len, 300)]
    paged, q, kv_scale = fp8_inputs(seqlens, q_len, heads, page, dim, gen, device=device, q_mag=q_mag)
    if q_mag > 1.0:
        q[0, 0, 0] = 0.0  # an all-zero row next to huge ones: its power-of-two scale must stay finite
    cfg = replace(default_fp8_config(q_len * heads), **overrides)
    cfg = replace(cfg, min_split_tokens=min_chunk) if min_chunk else cfg
    out, lse = mla_decode_fp8_with_config(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, causal, dv,
                                          kv_scale, config=cfg, num_splits=splits)  # fmt: skip
    ref_out, ref_lse = reference(q, paged, kv_scale, causal, dv)
    c_out = compare(out, ref_out, TOLERANCES["attention"][F8])
    c_lse = compare(lse, ref_lse, TOLERANCES["lse"][F8])
    return {
        "ok": c_out.ok and c_lse.ok and out.dtype == q.dtype,
        "report": f"seed={seed} seqlens={seqlens}: " + c_out.report("out") + "; " + c_lse.report("lse"),
    }


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, Any]]:
    return run_in_interpreter(__file__, timeout=900)


@pytest.mark.parametrize("case_id", list(CASES))
def test_triton_fp8_interpreter_matches_fp64(case_id: str, interpreter_results: dict[str, dict[str, Any]]) -> None:
    result = interpreter_results[case_id]
    assert result["ok"], result["report"]


# ----------------------------------------------------------------------------------- GPU
# DeepSeek head counts per TP rank x q_len at page 64, then the other page sizes (kept short: each
# distinct tile / page size is a separate Triton compilation on the device)
GPU_GRID = [(h, ql, 64) for h in (16, 128) for ql in (1, 2, 4)] + [
    (16, 1, 16), (32, 4, 32), (64, 8, 64), (128, 2, 128), (64, 1, 64), (32, 2, 64)
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("heads,q_len,page", GPU_GRID)
def test_gpu_fp8_matches_fp64(heads: int, q_len: int, page: int, gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    seqlens = [1, q_len, page * rng.randrange(3, 12) + rng.randrange(1, page), rng.randrange(page, 2500)]
    paged, q, kv_scale = fp8_inputs(seqlens, q_len, heads, page, 576, gen, device="cuda")
    out, lse = tk.registry.select("mla_decode", "cuda", torch.bfloat16, kv_dtype=F8, page_size=page, q_len=q_len,
                                  heads=heads, head_dim=576)(q, paged.kv_cache, paged.block_table, paged.cache_seqlens,
                                                             SCALE, True, 512, kv_scale)  # fmt: skip
    ref_out, ref_lse = reference(q, paged, kv_scale)
    assert out.shape == (4, q_len, heads, 512) and out.dtype == torch.bfloat16
    assert_close(out, ref_out, "attention", F8, f"out seqlens={seqlens}")
    assert_close(lse, ref_lse, "lse", F8, f"lse seqlens={seqlens}")


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", list(CASES))
def test_gpu_fp8_variants(case_id: str, gen: torch.Generator) -> None:
    result = run_case(CASES[case_id], int(torch.randint(0, 2**31, (1,), generator=gen)), "cuda", None)
    assert result["ok"], result["report"]


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,heads", [(1, 16), (4, 16), (2, 128)])
def test_gpu_fp8_long_sequences(q_len: int, heads: int, gen: torch.Generator) -> None:
    from tokenspeed_kernels.triton.mla_decode_fp8 import mla_decode_fp8

    seqlens = [33000, 17] if heads == 16 else [9000]
    paged, q, kv_scale = fp8_inputs(seqlens, q_len, heads, 64, 576, gen, device="cuda")
    out, lse = mla_decode_fp8(q, paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, True, 512, kv_scale)
    ref_out, ref_lse = reference(q, paged, kv_scale)
    assert_close(out, ref_out, "attention", F8)
    assert_close(lse, ref_lse, "lse", F8, "lse")


@pytest.mark.gpu
def test_gpu_fp8_cuda_graph_replay_equals_eager(gen: torch.Generator) -> None:
    from tokenspeed_kernels.triton.mla_decode_fp8 import mla_decode_fp8

    paged, q, kv_scale = fp8_inputs([3000, 900, 4100, 5], 2, 16, 64, 576, gen, device="cuda")
    args = (paged.kv_cache, paged.block_table, paged.cache_seqlens, SCALE, True, 512, kv_scale)
    graph, captured = capture_graph(lambda: mla_decode_fp8(q, *args))
    paged.cache_seqlens.copy_(torch.tensor([1500, 850, 64, 2], dtype=torch.int32))
    q.copy_(torch.randn(4, 2, 16, 576, generator=gen).to(torch.bfloat16))
    kv_scale.fill_(0.3)
    graph.replay()
    torch.cuda.synchronize()
    fresh = mla_decode_fp8(q, *args)
    assert torch.equal(captured[0], fresh[0]) and torch.equal(captured[1], fresh[1])
    ref_out, _ = reference(q, paged, kv_scale)
    assert_close(captured[0], ref_out, "attention", F8, "replayed out")


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    interpret_main({cid: partial(run_case, case) for cid, case in CASES.items()}, int(sys.argv[2]))
