"""Llama (and SmolLM2, tied embeddings): GQA attention, SwiGLU MLP.

Attention heads (and KV heads, replicated when fewer than ranks) split over ``attn``; the MLP
over ``dense``. The paged K/V of every sequence's prefix + new tokens are gathered and
attended with the ragged ``mla_prefill`` op (GQA-capable, causal bottom-right), in EXTEND and
DECODE alike.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from tokenspeed_engine.forward_batch import ForwardBatch
from tokenspeed_engine.kv_cache import MHAKVCache, gather_paged_kv, write_paged_kv
from tokenspeed_engine.layers.activation import silu_and_mul
from tokenspeed_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tokenspeed_engine.layers.kernels import kernel
from tokenspeed_engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tokenspeed_engine.layers.norm import ResidualRMSNorm
from tokenspeed_engine.layers.rotary import RotaryEmbedding
from tokenspeed_engine.models.base import CausalLM, DecoderModel, Stages
from tokenspeed_engine.models.configs import LlamaConfig
from tokenspeed_engine.spmd.groups import ParallelContext, ParallelGroup
from tokenspeed_engine.spmd.placement import Layout, Partial, Replicate


class LlamaAttention(nn.Module):
    """GQA self-attention; stage ``Replicate@attn -> Partial@attn``."""

    def __init__(self, cfg: LlamaConfig, layer_id: int, group: ParallelGroup, dtype: Any, device: Any):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.layer_id, self.head_dim = layer_id, cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            group,
            bias=cfg.attention_bias,
            **kw,
        )
        self.heads, self.kv_heads = self.qkv_proj.local_heads, self.qkv_proj.local_kv_heads
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, group, bias=cfg.attention_bias, **kw
        )
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope, cfg.max_position_embeddings, device=device)
        self.scaling = cfg.head_dim**-0.5
        self.spmd_in, self.spmd_out = Layout(group.name, Replicate()), Layout(group.name, Partial())

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        T, hd = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q, k = self.rotary_emb(batch.positions, q.view(T, self.heads, hd), k.view(T, self.kv_heads, hd))
        k_cache, v_cache = cache
        write_paged_kv(k_cache, batch.out_cache_loc, k)
        write_paged_kv(v_cache, batch.out_cache_loc, v.view(T, self.kv_heads, hd))
        k_all, v_all = gather_paged_kv(k_cache, batch.kv_slots), gather_paged_kv(v_cache, batch.kv_slots)
        out, _ = kernel("mla_prefill", q, head_dim_qk=hd, head_dim_v=hd)(
            q,
            k_all,
            v_all,
            batch.cu_seqlens_q,
            batch.cu_seqlens_k,
            batch.max_extend_len,
            batch.max_seq_len,
            self.scaling,
            True,
        )
        return self.o_proj(out.reshape(T, self.heads * hd))


class LlamaMLP(nn.Module):
    """SwiGLU MLP; stage ``Replicate@dense -> Partial@dense``."""

    def __init__(self, cfg: LlamaConfig, group: ParallelGroup, dtype: Any, device: Any):
        super().__init__()
        inter, kw = cfg.intermediate_size, {"dtype": dtype, "device": device}
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [inter, inter], group, bias=cfg.mlp_bias, **kw)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, group, bias=cfg.mlp_bias, **kw)
        self.spmd_in, self.spmd_out = Layout(group.name, Replicate()), Layout(group.name, Partial())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_id: int, ctx: ParallelContext, dtype: Any, device: Any):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.layer_id = layer_id
        self.input_layernorm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, group="attn", **kw)
        self.self_attn = LlamaAttention(cfg, layer_id, ctx.group("attn"), dtype, device)
        self.post_attention_layernorm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, group="attn", **kw)
        self.mlp = LlamaMLP(cfg, ctx.group("dense"), dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, kv: MHAKVCache):
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, kv[self.layer_id])
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def spmd_stages(self, prefix: str) -> Stages:
        names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        return [(f"{prefix}.{n}", getattr(self, n)) for n in names]


class LlamaForCausalLM(CausalLM):
    """See :class:`tokenspeed_engine.models.base.CausalLM` for the call."""

    def __init__(
        self,
        config: LlamaConfig,
        parallel: ParallelContext | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: Any = None,
    ):
        super().__init__()
        self.config, self.dtype = config, dtype
        ctx = self.parallel = parallel or ParallelContext.single()
        attn, kw = ctx.group("attn"), {"dtype": dtype, "device": device}
        embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, attn, **kw)
        layers = [LlamaDecoderLayer(config, i, ctx, dtype, device) for i in range(config.num_hidden_layers)]
        norm = ResidualRMSNorm(config.hidden_size, config.rms_norm_eps, group="attn", **kw)
        self.model = DecoderModel(embed, layers, norm)
        tied = embed if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, attn, tied_to=tied, **kw)
        self.compile_spmd()

    def make_kv_cache(self, num_pages: int, page_size: int, device: Any = None) -> MHAKVCache:
        """K/V caches with this rank's KV heads (page 0 included, never handed out)."""
        attn = self.model.layers[0].self_attn
        device = device or self.lm_head.weight.device
        return MHAKVCache(
            self.config.num_hidden_layers, num_pages, page_size, attn.kv_heads, attn.head_dim, self.dtype, device
        )

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token takes on this rank over all layers (K and V; for sizing the page pool)."""
        attn = self.model.layers[0].self_attn
        return 2 * self.config.num_hidden_layers * attn.kv_heads * attn.head_dim * self.dtype.itemsize


_QKV = re.compile(r"(.*\.self_attn)\.(q|k|v)_proj\.(weight|bias)$")
_GATE_UP = re.compile(r"(.*\.mlp)\.(gate|up)_proj\.(weight|bias)$")


class LlamaWeightMapper:
    """HF Llama names -> fused ``qkv_proj`` (shards q/k/v) and ``gate_up_proj`` (shards 0/1)."""

    def __init__(self, config: LlamaConfig):
        self.tied = config.tie_word_embeddings

    def map(self, name: str) -> list[tuple[str, Any]] | None:
        if name.endswith("rotary_emb.inv_freq") or (self.tied and name == "lm_head.weight"):
            return None
        m = _QKV.match(name)
        if m:
            return [(f"{m[1]}.qkv_proj.{m[3]}", m[2])]
        m = _GATE_UP.match(name)
        if m:
            return [(f"{m[1]}.gate_up_proj.{m[3]}", 0 if m[2] == "gate" else 1)]
        return [(name, None)]

    def reverse(self, param: str, shard_id: Any) -> str:
        if ".qkv_proj." in param:
            return param.replace(".qkv_proj.", f".{shard_id}_proj.")
        if ".gate_up_proj." in param:
            return param.replace(".gate_up_proj.", ".gate_proj." if shard_id == 0 else ".up_proj.")
        return param
