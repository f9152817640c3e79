"""TokenSpeed engine: scheduler binding, SPMD modeling, models, executor, server.

The engine reaches kernels only through ``tokenspeed_kernels``. ``LLM`` (offline) loads
lazily so that ``import tokenspeed_engine`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from tokenspeed_engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tokenspeed_engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
