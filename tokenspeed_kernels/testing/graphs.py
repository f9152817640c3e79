"""CUDA-graph capture for the tests' "graph replay equals eager" checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture_graph(step: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``step`` once on a side stream (lazy initialisation, Triton compilation and
    allocator warm-up stay outside the capture), then capture one call of it.

    Returns the graph and what the captured call returned: its tensors are the graph's
    static outputs, rewritten by every ``graph.replay()``.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
