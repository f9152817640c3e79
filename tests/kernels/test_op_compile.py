"""Every op passes torch.library.opcheck and traces under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import tokenspeed_kernels as tk
from tokenspeed_kernels.testing import make_paged_kv


def _cases(device: str = "cpu", dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    paged = make_paged_kv([9, 20], 8, 40, dtype, generator=g)
    q = torch.randn(2, 2, 4, 40, generator=g).to(dtype)
    cq = torch.tensor([0, 3, 7], dtype=torch.int32)
    ck = torch.tensor([0, 5, 12], dtype=torch.int32)
    qp, kp, vp = torch.randn(7, 4, 24).to(dtype), torch.randn(12, 2, 24).to(dtype), torch.randn(12, 2, 16).to(dtype)
    oa, ob = torch.randn(5, 3, 16).to(dtype), torch.randn(5, 3, 16).to(dtype)
    la, lb = torch.randn(5, 3), torch.randn(5, 3)
    logits = torch.randn(6, 16)
    x = torch.randn(6, 32).to(dtype)
    w13, w2 = torch.randn(4, 48, 32).to(dtype) * 0.1, torch.randn(4, 32, 24).to(dtype) * 0.1
    tw, ti = torch.rand(6, 2), torch.randint(0, 4, (6, 2), dtype=torch.int32)
    cases = {
        "mla_decode": (paged.kv_cache, q, paged.block_table, paged.cache_seqlens),
        "mla_prefill": (qp, kp, vp, cq, ck),
        "merge_attn_states": (oa, la, ob, lb),
        "moe_route": (logits,),
        "fused_moe": (x, w13, w2, tw, ti),
    }
    to = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
    kv, q, bt, sl = to(cases["mla_decode"])
    return {
        "mla_decode": ((q, kv, bt, sl, 0.1, True, 32, None), {}),
        "mla_prefill": (to(cases["mla_prefill"]) + (4, 7, 0.2, True), {}),
        "merge_attn_states": (to(cases["merge_attn_states"]), {}),
        "moe_route": (to(cases["moe_route"]) + (4, "sigmoid", torch.zeros(16, device=device), 4, 2, True, 2.0), {}),
        "fused_moe": (to(cases["fused_moe"]) + (None, None, 0), {}),
    }


@pytest.mark.parametrize("op", ["mla_decode", "mla_prefill", "merge_attn_states", "moe_route", "fused_moe"])
def test_opcheck_cpu(op: str) -> None:
    args, kwargs = _cases()[op]
    torch.library.opcheck(getattr(torch.ops.tokenspeed, op).default, args, kwargs)


@pytest.mark.parametrize("op", ["mla_decode", "mla_prefill", "merge_attn_states", "moe_route", "fused_moe"])
def test_compile_fullgraph_matches_eager(op: str) -> None:
    args, _ = _cases()[op]
    fn = getattr(torch.ops.tokenspeed, op)

    def call(*a):
        return fn(*a)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    eager = call(*args)
    traced = compiled(*args)
    as_tuple = lambda x: x if isinstance(x, tuple) else (x,)  # noqa: E731
    for e, t in zip(as_tuple(eager), as_tuple(traced), strict=True):
        assert torch.equal(e, t)


def test_compile_inductor_composes_ops() -> None:
    """The ops inside a larger inductor-compiled function (decode + merge)."""
    (q, kv, bt, sl, *_), _ = _cases()["mla_decode"]

    def step(q, kv, bt, sl):
        out, lse = tk.mla_decode(q, kv, bt, sl, 0.1, True, 32)
        merged, _ = tk.merge_attn_states(out, lse, out * 2, lse)
        return merged.sum(dim=-1)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    assert torch.allclose(compiled(q, kv, bt, sl), step(q, kv, bt, sl), atol=1e-5, rtol=1e-5)
