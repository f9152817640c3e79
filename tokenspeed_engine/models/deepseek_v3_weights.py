"""Checkpoint names of DeepSeek-V3 (HF / DeepSeek layout) -> this package's parameters.

Differences from the checkpoint: gate_proj + up_proj are fused (``gate_up_proj``, shards 0/1);
routed experts are stacked (``mlp.experts.w13`` / ``w2``, shard ``(expert, "gate"|"up"|"down")``,
and ``w13_scale`` / ``w2_scale`` for fp8 ``weight_scale_inv``); NextN layer k, stored as
``model.layers.{num_hidden_layers + k}``, becomes ``mtp.{k}`` (``input.{enorm,hnorm,eh_proj}``,
``block.*``, ``final_norm`` from ``shared_head.norm``). The NextN copies of the embedding and
the LM head are ignored: they equal the main model's, which the NextN layer shares.
"""

from __future__ import annotations

import re
from typing import Any

from tokenspeed_engine.models.configs import DeepseekV3Config

_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.(weight|weight_scale_inv)$")
_FUSED = re.compile(r"(mlp(?:\.shared_experts)?)\.(gate|up)_proj\.(weight|weight_scale_inv)$")
_MTP_INPUT = ("enorm.", "hnorm.", "eh_proj.")


class DeepseekV3WeightMapper:
    def __init__(self, config: DeepseekV3Config, num_mtp_layers: int):
        self.n = config.num_hidden_layers
        self.num_mtp = num_mtp_layers
        self.tied = config.tie_word_embeddings

    def map(self, name: str) -> list[tuple[str, Any]] | None:
        if name.endswith("rotary_emb.inv_freq") or (self.tied and name.startswith("lm_head.")):
            return None
        if not name.startswith("model.layers."):
            return [(name, None)]
        _, _, idx, rest = name.split(".", 3)
        i = int(idx)
        if i < self.n:
            return self._layer(f"model.layers.{i}.", rest)
        k = i - self.n
        if k >= self.num_mtp or rest.startswith(("shared_head.head.", "embed_tokens.")):
            return None  # NextN layers not asked for; NextN copies of shared tensors
        if rest.startswith(_MTP_INPUT):
            return [(f"mtp.{k}.input.{rest}", None)]
        if rest.startswith("shared_head.norm."):
            return [(f"mtp.{k}.final_norm.{rest[len('shared_head.norm.') :]}", None)]
        return self._layer(f"mtp.{k}.block.", rest)

    @staticmethod
    def _layer(prefix: str, rest: str) -> list[tuple[str, Any]]:
        m = _EXPERT.match(rest)
        if m:
            expert, kind, what = int(m[1]), m[2], m[3]
            param = ("w2" if kind == "down" else "w13") + ("_scale" if what == "weight_scale_inv" else "")
            return [(f"{prefix}mlp.experts.{param}", (expert, kind))]
        m = _FUSED.match(rest)
        if m:
            return [(f"{prefix}{m[1]}.gate_up_proj.{m[3]}", 0 if m[2] == "gate" else 1)]
        return [(prefix + rest, None)]

    def reverse(self, param: str, shard_id: Any) -> str:
        """The checkpoint name a parameter shard is loaded from (for error messages)."""
        name = param
        m = re.match(r"mtp\.(\d+)\.(input\.|block\.|final_norm\.)(.*)$", name)
        if m:
            layer = f"model.layers.{self.n + int(m[1])}."
            rest = m[3] if m[2] != "final_norm." else "shared_head.norm." + m[3]
            name = layer + rest
        m = re.match(r"(.*mlp\.experts)\.(w13|w2)(_scale)?$", name)
        if m and isinstance(shard_id, tuple):
            return f"{m[1]}.{shard_id[0]}.{shard_id[1]}_proj." + ("weight_scale_inv" if m[3] else "weight")
        if ".gate_up_proj." in name and shard_id in (0, 1):
            return name.replace(".gate_up_proj.", ".gate_proj." if shard_id == 0 else ".up_proj.")
        return name
