"""What the causal LMs share: the decoder stack, logits, the SPMD chain, the call signature.

The model call, for the engine::

    logits = model(batch, kv_cache)                          # [B, vocab]: each sequence's last token
    logits = model(batch, kv_cache, return_all_logits=True)  # [T, vocab]: every new token (spec verify)
    logits, hidden = model(batch, kv_cache, return_hidden=True)  # hidden [T, hidden], after the final norm

Logits are float in the model dtype, replicated on every rank of the attention group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenspeed_engine.forward_batch import ForwardBatch
from tokenspeed_engine.spmd.compiler import SpmdProgram, compile_chains
from tokenspeed_engine.spmd.groups import ParallelContext
from tokenspeed_engine.spmd.placement import Layout, Replicate

Stages = list[tuple[str, nn.Module]]
LOGITS_LAYOUT = Layout("attn", Replicate())


class DecoderModel(nn.Module):
    """``embed_tokens -> layers -> norm``; each layer maps ``(x, residual) -> (x, residual)``."""

    def __init__(self, embed_tokens: nn.Module, layers: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.embed_tokens, self.layers, self.norm = embed_tokens, nn.ModuleList(layers), norm

    def forward(self, batch: ForwardBatch, kv_cache: Any) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, batch, kv_cache)
        return self.norm(x, residual)[0]

    def spmd_stages(self) -> Stages:
        stages: Stages = [("model.embed_tokens", self.embed_tokens)]
        for i, layer in enumerate(self.layers):
            stages += layer.spmd_stages(f"model.layers.{i}")
        return stages + [("model.norm", self.norm)]


class CausalLM(nn.Module):
    """Base of the models: subclasses build ``self.model`` (DecoderModel) and ``self.lm_head``, then call
    :meth:`compile_spmd`."""

    config: Any
    parallel: ParallelContext
    model: DecoderModel
    lm_head: nn.Module
    spmd_program: SpmdProgram

    def forward(
        self, batch: ForwardBatch, kv_cache: Any, return_all_logits: bool = False, return_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(batch, kv_cache)
        logits = self.compute_logits(hidden, batch, return_all_logits)
        return (logits, hidden) if return_hidden else logits

    def compute_logits(self, hidden: torch.Tensor, batch: ForwardBatch, all_positions: bool = False) -> torch.Tensor:
        rows = hidden if all_positions else hidden.index_select(0, batch.last_token_indices())
        return self.lm_head(rows)[..., : self.config.vocab_size]

    def spmd_chains(self) -> dict[str, tuple[Stages, Layout]]:
        return {"main": (self.model.spmd_stages() + [("lm_head", self.lm_head)], LOGITS_LAYOUT)}

    def compile_spmd(self) -> None:
        """Insert the collectives (once, at construction)."""
        self.spmd_program = compile_chains(self.spmd_chains(), self.parallel)
