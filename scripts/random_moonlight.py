"""Shared by the device scripts that drive the engine with a random Moonlight-shaped model.

``IdTokenizer`` (prompts are space-separated token ids) and ``moonlight_config`` (the real
shape, fewer layers, or a tiny variant that checks a script on the CPU).
"""

from __future__ import annotations

import dataclasses

from tokenspeed_engine.models.configs import DeepseekV3Config, moonlight_16b_a3b_config


class IdTokenizer:
    def encode(self, text: str) -> list[int]:
        return [int(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{i} " for i in ids)


def moonlight_config(tiny: bool = False, layers: int | None = None) -> DeepseekV3Config:
    """Moonlight-16B-A3B's shape; ``tiny``: 2 narrow layers and 8 experts; ``layers``: that many layers."""
    cfg = moonlight_16b_a3b_config()
    if tiny:
        narrow = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2)
        cfg = dataclasses.replace(cfg, **narrow, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    return cfg
