"""The CUDA merge_attn_states kernel against the fp64 reference (GPU only)."""

from __future__ import annotations

import pytest
import torch

import tokenspeed_kernels as tk
from tokenspeed_kernels.reference import merge_attn_states_ref
from tokenspeed_kernels.testing import assert_close
from tokenspeed_kernels.testing.graphs import capture_graph

pytestmark = pytest.mark.gpu


def _inputs(shape, dtype, gen):
    a = torch.randn(*shape, generator=gen).to(dtype).cuda()
    b = torch.randn(*shape, generator=gen).to(dtype).cuda()
    la = (torch.randn(*shape[:-1], generator=gen) * 3).cuda()
    lb = (torch.randn(*shape[:-1], generator=gen) * 3).cuda()
    la[0, 0] = -torch.inf  # one side empty
    la[1, 0], lb[1, 0] = -torch.inf, -torch.inf  # both empty
    return a, la, b, lb


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 16, 512), (5, 3, 128), (4, 7, 13)])
def test_matches_reference(dtype, shape, gen) -> None:
    a, la, b, lb = _inputs(shape, dtype, gen)
    out, lse = tk.merge_attn_states(a, la, b, lb)
    ref_out, ref_lse = merge_attn_states_ref(a.double(), la, b.double(), lb)
    assert_close(out, ref_out, "attention", dtype)
    assert_close(lse, ref_lse, "lse", dtype, "lse")
    cpu_out, _ = tk.merge_attn_states(a.cpu(), la.cpu(), b.cpu(), lb.cpu())
    assert_close(out, cpu_out.double(), "attention", dtype, "vs CPU implementation")


def test_cuda_graph_replay_equals_eager_bitwise(gen) -> None:
    a, la, b, lb = _inputs((64, 16, 512), torch.bfloat16, gen)
    eager = tk.merge_attn_states(a, la, b, lb)
    graph, captured = capture_graph(lambda: tk.merge_attn_states(a, la, b, lb))
    a2, la2, b2, lb2 = _inputs((64, 16, 512), torch.bfloat16, gen)
    for dst, src in ((a, a2), (la, la2), (b, b2), (lb, lb2)):
        dst.copy_(src)
    graph.replay()
    fresh = tk.merge_attn_states(a, la, b, lb)
    assert torch.equal(captured[0], fresh[0]) and torch.equal(captured[1], fresh[1])
    assert not torch.equal(captured[0], eager[0])


def test_opcheck_cuda(gen) -> None:
    a, la, b, lb = _inputs((9, 4, 64), torch.bfloat16, gen)
    torch.library.opcheck(torch.ops.tokenspeed.merge_attn_states.default, (a, la, b, lb))


def test_rejects_non_contiguous(gen) -> None:
    a, la, b, lb = _inputs((8, 4, 64), torch.float32, gen)
    with pytest.raises(RuntimeError, match=r"merge_attn_states: CUDA inputs must be contiguous"):
        tk.merge_attn_states(a.transpose(0, 1), la.t(), b.transpose(0, 1), lb.t())
