"""The Triton mla_prefill backend against the fp64 reference.

CPU: the kernel runs under the Triton interpreter in one subprocess (TRITON_INTERPRET must be
set before Triton decorates the kernels, and the GPU tests of this module need them
compiled), on ragged batches whose lengths are not multiples of the tiles, with NaN rows
after the last sequence's q and k/v (a read past a sequence shows up as NaN). The
interpreter's tl.dot mishandles 16-bit floats, so there the kernel upcasts its tiles to fp32
exactly (same products, fp32 accumulation); the tensor-core path is covered on the GPU.
GPU (``-m gpu``): DeepSeek 192/128 with 16 and 128 heads, Llama 64/64 and 128/128 GQA, long
cached prefixes, CUDA-graph replay with changed lengths, and the prefix + chunk merge.
"""

from __future__ import annotations

import os
import random
import sys
from functools import partial
from typing import Any

import pytest
import torch

from tokenspeed_kernels.reference import mla_prefill_ref
from tokenspeed_kernels.testing import TOLERANCES, assert_close, compare
from tokenspeed_kernels.testing.graphs import capture_graph
from tokenspeed_kernels.testing.interpreter import interpret_main, run_in_interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# id: (dtype, heads, kv_heads, dqk, dv, causal, (lq, lk) pairs or None = random ragged, (block_m, block_n) or None)
CPU_CASES: dict[str, tuple[Any, ...]] = {
    "bf16-ds-causal-64x32": ("bfloat16", 2, 2, 192, 128, True, None, (64, 32)),
    "bf16-ds-noncausal-32x64": ("bfloat16", 2, 2, 192, 128, False, None, (32, 64)),
    "fp16-llama-gqa-causal-16x16": ("float16", 4, 2, 64, 64, True, None, (16, 16)),
    "fp32-ds-gqa3-causal-32x32": ("float32", 3, 1, 192, 128, True, None, (32, 32)),
    "fp32-dims96-noncausal-16x32": ("float32", 2, 1, 96, 32, False, None, (16, 32)),
    "bf16-q-longer-than-kv-and-empty": ("bfloat16", 2, 1, 192, 128, True, [(40, 17), (0, 0), (5, 0), (0, 9), (3, 3)], (16, 16)),
    "fp16-q-longer-than-kv-noncausal": ("float16", 2, 2, 64, 64, False, [(40, 17), (5, 0), (19, 33)], (16, 16)),
    "bf16-single-tokens-default-config": ("bfloat16", 4, 4, 192, 128, True, [(1, 1), (1, 150), (2, 77)], None),
    "bf16-one-long-default-config": ("bfloat16", 1, 1, 192, 128, True, [(300, 300)], None),
}


def random_lengths(rng: random.Random, n: int = 4, top: int = 300) -> list[tuple[int, int]]:
    """Ragged (lq, lk) with kv >= q (a chunk over a cached prefix), one length-1 query, one lq == lk."""
    lq = [1, rng.randrange(2, top)] + [rng.randrange(1, top) for _ in range(n - 2)]
    lk = [lq[0] + rng.randrange(0, 50), lq[1]] + [q + rng.randrange(0, 120) for q in lq[2:]]
    pairs = list(zip(lq, lk, strict=True))
    rng.shuffle(pairs)
    return pairs


def make_inputs(pairs: list[tuple[int, int]], heads: int, kv_heads: int, dqk: int, dv: int, dtype: torch.dtype,
                device: str, gen: torch.Generator, poison: int = 3) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Packed q, k, v and cu_seqlens; ``poison`` NaN rows follow the last sequence in q, k and v."""
    tq, tk = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    q = torch.randn(tq + poison, heads, dqk, generator=gen).to(dtype)
    k = torch.randn(tk + poison, kv_heads, dqk, generator=gen).to(dtype)
    v = torch.randn(tk + poison, kv_heads, dv, generator=gen).to(dtype)
    for t in (q, k, v):
        t[t.shape[0] - poison :] = float("nan")

    def cu(lens: list[int]) -> torch.Tensor:
        return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)

    cq, ck = cu([p[0] for p in pairs]), cu([p[1] for p in pairs])
    return tuple(t.to(device) for t in (q, k, v, cq, ck))


def run_case(case: tuple[Any, ...], seed: int, device: str = "cpu") -> dict[str, Any]:
    from tokenspeed_kernels.triton.mla_prefill import MlaPrefillConfig, default_config, mla_prefill_with_config

    dtype_name, heads, kv_heads, dqk, dv, causal, pairs, tile = case
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    pairs = pairs or random_lengths(random.Random(seed))
    q, k, v, cq, ck = make_inputs(pairs, heads, kv_heads, dqk, dv, dtype, device, gen)
    mq, mk = max(p[0] for p in pairs), max(p[1] for p in pairs)
    scale = dqk**-0.5
    cfg = MlaPrefillConfig(tile[0], tile[1], 4, 1) if tile else default_config(dqk, dv, mq)
    out, lse = mla_prefill_with_config(q, k, v, cq, ck, mq, mk, scale, causal, config=cfg)
    tq = int(cq[-1])
    ref_out, ref_lse = mla_prefill_ref(q.double(), k.double(), v.double(), cq, ck, mq, mk, scale, causal)
    c_out = compare(out[:tq], ref_out[:tq], TOLERANCES["attention"][dtype])
    c_lse = compare(lse[:tq], ref_lse[:tq], TOLERANCES["lse"][dtype])
    return {
        "ok": c_out.ok and c_lse.ok and out.dtype == dtype and lse.dtype == torch.float32,
        "report": f"seed={seed} (lq, lk)={pairs} cfg={cfg}: " + c_out.report("out") + "; " + c_lse.report("lse"),
    }


def run_merge(seed: int, device: str = "cpu") -> dict[str, Any]:
    """Chunked prefill as the engine runs it: the chunk over its cached prefix (non-causal)
    merged with the chunk over itself (causal) equals causal attention over prefix + chunk."""
    import tokenspeed_kernels as tk
    from tokenspeed_kernels.triton.mla_prefill import MlaPrefillConfig, mla_prefill_with_config

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    chunks = [rng.randrange(1, 90) for _ in range(3)]
    prefixes = [rng.randrange(0, 200) for _ in range(2)] + [0]  # a sequence without prefix: one side empty
    pairs = [(c, c + p) for c, p in zip(chunks, prefixes, strict=True)]
    q, k, v, cq, ck = make_inputs(pairs, 2, 2, 192, 128, torch.bfloat16, device, gen, poison=0)
    cfg = MlaPrefillConfig(32, 32, 4, 1)

    def run(kk: torch.Tensor, vv: torch.Tensor, cuk: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return mla_prefill_with_config(q, kk, vv, cq, cuk, max(chunks), int(cuk.diff().max()), 0.1, causal, config=cfg)

    whole = run(k, v, ck, True)
    pre_idx = torch.cat([torch.arange(int(ck[b]), int(ck[b]) + p) for b, p in enumerate(prefixes)]).long()
    new_idx = torch.cat([torch.arange(int(ck[b]) + p, int(ck[b + 1])) for b, p in enumerate(prefixes)]).long()
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)  # noqa: E731
    a = run(k[pre_idx], v[pre_idx], cu(prefixes), False)
    b = run(k[new_idx], v[new_idx], cu(chunks), True)
    out, lse = tk.merge_attn_states(a[0], a[1], b[0], b[1])
    c_out = compare(out, whole[0], TOLERANCES["attention"][torch.bfloat16])
    c_lse = compare(lse, whole[1], TOLERANCES["lse"][torch.bfloat16])
    report = f"seed={seed} pairs={pairs}: " + c_out.report("out") + "; " + c_lse.report("lse")
    return {"ok": c_out.ok and c_lse.ok, "report": report}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict[str, Any]]:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case_id", [*CPU_CASES, "merge-prefix-and-chunk"])
def test_interpreter_matches_fp64_reference(case_id: str, interpreter_results: dict[str, dict[str, Any]]) -> None:
    result = interpreter_results[case_id]
    assert result["ok"], result["report"]


def test_rejects_unsupported_inputs() -> None:
    from tokenspeed_kernels.triton.mla_prefill import mla_prefill

    cu = torch.tensor([0, 4], dtype=torch.int32)
    ok = dict(q=torch.zeros(4, 4, 192), k=torch.zeros(4, 2, 192), v=torch.zeros(4, 2, 128))
    bad = [
        ({"k": torch.zeros(4, 3, 192), "v": torch.zeros(4, 3, 128)}, "multiple of kv_heads"),
        ({"q": torch.zeros(4, 4, 200), "k": torch.zeros(4, 2, 200)}, "head_dim_qk = 200"),
        ({"v": torch.zeros(4, 2, 96)}, "head_dim_v = 96"),
        ({"q": torch.zeros(4, 4, 192, dtype=torch.float64)}, "not supported"),
        ({"k": torch.zeros(4, 2, 192, dtype=torch.float16)}, "must have q's dtype"),
    ]
    for change, message in bad:
        args = {**ok, **change}
        with pytest.raises(ValueError, match=message):
            mla_prefill(args["q"], args["k"], args["v"], cu, cu, 4, 4, 0.1, True)
    with pytest.raises(ValueError, match="int32"):
        mla_prefill(ok["q"], ok["k"], ok["v"], cu.long(), cu, 4, 4, 0.1, True)


def test_registration_traits() -> None:
    from tokenspeed_kernels import registry
    from tokenspeed_kernels.registry import A100, CPU, H100, DeviceInfo
    from tokenspeed_kernels.triton import register_triton_kernels

    had = any(k.backend == "triton" for k in registry.kernels("mla_prefill"))
    register_triton_kernels()
    try:
        with registry.use_backend("triton", "mla_prefill"):  # the sm90 kernel outranks it on an H100
            k = registry.select("mla_prefill", H100, torch.bfloat16, head_dim_qk=192, head_dim_v=128)
        assert k.backend == "triton" and k.impl == "tokenspeed_kernels.triton.mla_prefill:mla_prefill"
        with registry.use_backend("triton", "mla_prefill"):
            for dev, dtype, dims in ((A100, torch.float16, (64, 64)), (H100, torch.bfloat16, (128, 128))):
                assert registry.select("mla_prefill", dev, dtype, head_dim_qk=dims[0], head_dim_v=dims[1]).backend == "triton"
            for bad in ({"head_dim_qk": 576}, {"head_dim_v": 512}):
                with pytest.raises(registry.NoKernelError):
                    registry.select("mla_prefill", H100, torch.bfloat16, **bad)
            with pytest.raises(registry.NoKernelError):
                registry.select("mla_prefill", H100, torch.float32)
            for dev in (CPU, DeviceInfo("nvidia", (7, 5), "T4 (fake)")):
                with pytest.raises(registry.NoKernelError):
                    registry.select("mla_prefill", dev, torch.bfloat16)
    finally:
        if not had:
            registry.unregister("mla_prefill", "triton")


# ----------------------------------------------------------------------------------- GPU
# (dtype, heads, kv_heads, dqk, dv, causal)
GPU_GRID = [("bfloat16", h, h, 192, 128, c) for h in (16, 128) for c in (True, False)] + [
    ("float16", 16, 16, 192, 128, True), ("bfloat16", 32, 8, 64, 64, True), ("float16", 32, 8, 64, 64, False),
    ("bfloat16", 32, 8, 128, 128, True), ("bfloat16", 8, 1, 192, 128, True),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_GRID, ids=lambda c: "-".join(map(str, c)))
def test_gpu_matches_fp64_reference(case: tuple[Any, ...], gen: torch.Generator) -> None:
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    pairs = random_lengths(rng, 5, 700) + [(0, 0), (3, 0), (130, 2000), (rng.randrange(1, 400), rng.randrange(400, 1500))]
    result = run_case((*case, pairs, None), int(torch.randint(0, 2**31, (1,), generator=gen)), "cuda")
    assert result["ok"], result["report"]


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
def test_gpu_long_prefix(heads: int, gen: torch.Generator) -> None:
    """A 1K chunk over a 9K cached prefix and a full 2K causal prompt, default tiles."""
    result = run_case(("bfloat16", heads, heads, 192, 128, True, [(1024, 10240), (2048, 2048)], None),
                      int(torch.randint(0, 2**31, (1,), generator=gen)), "cuda")  # fmt: skip
    assert result["ok"], result["report"]


@pytest.mark.gpu
def test_gpu_merge_prefix_and_chunk(gen: torch.Generator) -> None:
    result = run_merge(int(torch.randint(0, 2**31, (1,), generator=gen)), "cuda")
    assert result["ok"], result["report"]


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager_bitwise(gen: torch.Generator) -> None:
    """Lengths change between capture and replay (max_seqlen_q stays a bound): no host state."""
    from tokenspeed_kernels.triton.mla_prefill import mla_prefill

    pairs = [(300, 900), (17, 17), (512, 2000)]
    q, k, v, cq, ck = make_inputs(pairs, 16, 16, 192, 128, torch.bfloat16, "cuda", gen, poison=0)
    args = (cq, ck, 512, 2000, 192**-0.5, True)
    eager_before = mla_prefill(q, k, v, *args)
    graph, captured = capture_graph(lambda: mla_prefill(q, k, v, *args))
    cq.copy_(torch.tensor([0, 100, 350, 829], dtype=torch.int32))  # same totals are not needed, only bounds
    ck.copy_(torch.tensor([0, 1000, 1250, 2900], dtype=torch.int32))
    q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    fresh = mla_prefill(q, k, v, *args)
    assert torch.equal(captured[0][:829], fresh[0][:829]) and torch.equal(captured[1][:829], fresh[1][:829])
    assert not torch.equal(captured[0][:829], eager_before[0][:829])
    ref_out, ref_lse = mla_prefill_ref(q.double(), k.double(), v.double(), cq, ck, 512, 2000, 192**-0.5, True)
    assert_close(captured[0][:829], ref_out[:829], "attention", torch.bfloat16, "replayed out")
    assert_close(captured[1][:829], ref_lse[:829], "lse", torch.bfloat16, "replayed lse")


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    interpret_main(
        {**{cid: partial(run_case, case) for cid, case in CPU_CASES.items()}, "merge-prefix-and-chunk": run_merge},
        int(sys.argv[2]),
    )
