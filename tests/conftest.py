"""Shared pytest set-up: GPU markers skip cleanly where there is no suitable device."""

from __future__ import annotations

import pytest
import torch


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _is_sm90() -> bool:
    return _has_cuda() and torch.cuda.get_device_capability()[0] == 9


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    skip_sm90 = pytest.mark.skip(reason="needs a Hopper GPU (compute capability 9.x)")
    for item in items:
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(skip_gpu)
        elif "sm90" in item.keywords and not _is_sm90():
            item.add_marker(skip_sm90)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded CPU generator per test (random, but reproducible from the log)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
