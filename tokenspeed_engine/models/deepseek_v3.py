"""DeepSeek-V3 (also Kimi K2, Moonlight): MLA attention, MoE with shared experts, MTP.

Attention is split by heads over the ``attn`` group; MoE experts over the ``moe`` group
(expert and/or tensor parallel); first-k dense MLPs over the ``dense`` group. Stages declare
their placements; ``compile_chains`` inserts the collectives (none are written here).

MLA: the latent cache holds, per token, the normalised latent c (kv_lora_rank) and the
rotated shared key k_pe (qk_rope_head_dim).
  prefill / chunked prefill (EXTEND): non-absorbed. The latents of prefix + chunk are read
      back from the cache, up-projected by kv_b_proj into per-head k_nope and v, and the chunk
      attends to them with ``mla_prefill`` (causal, bottom-right aligned).
  decode (DECODE): absorbed. q_nope is folded through W_UK into latent space, ``mla_decode``
      attends directly over the paged latent cache, and W_UV maps the result back.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from tokenspeed_engine.forward_batch import ForwardBatch
from tokenspeed_engine.kv_cache import MLAKVCache, gather_paged_kv, write_paged_kv
from tokenspeed_engine.layers.activation import silu_and_mul
from tokenspeed_engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tokenspeed_engine.layers.kernels import kernel
from tokenspeed_engine.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear
from tokenspeed_engine.layers.moe import FusedExperts
from tokenspeed_engine.layers.norm import ResidualRMSNorm, RMSNorm
from tokenspeed_engine.layers.rotary import RotaryEmbedding, yarn_mscale
from tokenspeed_engine.models.base import LOGITS_LAYOUT, CausalLM, DecoderModel, Stages
from tokenspeed_engine.models.configs import DeepseekV3Config
from tokenspeed_engine.spmd.groups import ParallelContext, ParallelGroup
from tokenspeed_engine.spmd.placement import Layout, Partial, Replicate
from tokenspeed_kernels import env


class DeepseekV3Attention(nn.Module):
    """Multi-head latent attention; stage ``Replicate@attn -> Partial@attn``."""

    def __init__(self, cfg: DeepseekV3Config, layer_id: int, group: ParallelGroup, dtype: Any, device: Any):
        super().__init__()
        if cfg.num_attention_heads % group.size:
            raise ValueError(f"{cfg.num_attention_heads} heads do not split over attention TP {group.size}")
        self.layer_id = layer_id
        self.heads = cfg.num_attention_heads // group.size
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        H, hidden, kw = cfg.num_attention_heads, cfg.hidden_size, {"dtype": dtype, "device": device}
        if cfg.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, H * cfg.qk_head_dim, group, **kw)
        else:
            self.q_a_proj = Linear(hidden, cfg.q_lora_rank, bias=cfg.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, **kw)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, H * cfg.qk_head_dim, group, **kw)
        self.kv_a_proj_with_mqa = Linear(hidden, cfg.kv_lora_rank + self.rope, bias=cfg.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, **kw)
        self.kv_b_proj = ColumnParallelLinear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), group, **kw)
        self.o_proj = RowParallelLinear(H * self.v_dim, hidden, group, bias=cfg.attention_bias, **kw)
        self.fused_in_proj = None if cfg.attention_bias else self._fuse_input_projections(dtype, device)
        self.rotary_emb = RotaryEmbedding(
            self.rope, cfg.rope, cfg.max_position_embeddings, interleaved=cfg.rope_interleave, device=device
        )
        # YaRN: the softmax scale carries mscale(factor, mscale_all_dim)^2 (as HF and DeepSeek do).
        self.scaling = cfg.qk_head_dim**-0.5
        if cfg.rope.get("rope_type", "default") != "default" and cfg.rope.get("mscale_all_dim"):
            self.scaling *= yarn_mscale(cfg.rope["factor"], cfg.rope["mscale_all_dim"]) ** 2
        self.spmd_in, self.spmd_out = Layout(group.name, Replicate()), Layout(group.name, Partial())

    def _first_projection(self) -> Linear:
        """The query projection that reads the hidden state: q_proj, or q_a_proj with a q LoRA."""
        return self.q_proj if self.q_lora_rank is None else self.q_a_proj

    def _fuse_input_projections(self, dtype: Any, device: Any) -> torch.Tensor:
        """One weight [q rows + kv_a rows, hidden] for the two projections of the hidden state, so a
        decode step streams them in one GEMM (one launch, one pass over x). The layers' weights
        become views of its two halves: loaders and ``randomize_`` write through them unchanged."""
        first, kv_a = self._first_projection(), self.kv_a_proj_with_mqa
        a, b = first.weight, kv_a.weight
        fused = torch.empty(a.shape[0] + b.shape[0], a.shape[1], dtype=dtype, device=device)
        for layer, old, rows in ((first, a, fused[: a.shape[0]]), (kv_a, b, fused[a.shape[0] :])):
            rows.copy_(old.data)
            view = nn.Parameter(rows, requires_grad=False)
            view.__dict__.update(old.__dict__)  # weight_loader, expected_shards
            layer.weight = view
        return fused

    def _project_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first query projection, kv_a projection) of x: one GEMM while the layers' weights are
        still the halves of the fused one (a module moved with ``.to()`` gets two GEMMs)."""
        first, kv_a, fused = self._first_projection(), self.kv_a_proj_with_mqa, self.fused_in_proj
        if (
            fused is not None
            and first.weight.data_ptr() == fused.data_ptr()
            and kv_a.weight.data_ptr() == fused.data_ptr() + first.weight.numel() * fused.element_size()
        ):
            return torch.nn.functional.linear(x, fused).split([first.weight.shape[0], kv_a.weight.shape[0]], dim=-1)
        return first(x), kv_a(x)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, cache: torch.Tensor, kv_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``kv_scale``: the float32 [1] scale of an fp8 latent cache (None for a 16/32-bit one)."""
        T = x.shape[0]
        q, latent = self._project_input(x)
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.view(T, self.heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent_write = self._latent_write_kernel(latent, cache)
        q_abs = None  # a decode's absorbed query [T, heads, kv_lora_rank + rope]
        if latent_write is not None:
            # one kernel: kv_a RMSNorm, rope of k_pe and q_pe, the cache row; a decode's rotated
            # q_pe lands straight in the rope columns of the absorbed query
            if batch.is_decode:
                q_abs = torch.empty(T, self.heads, self.kv_lora_rank + self.rope, dtype=q.dtype, device=q.device)
                q_pe_out = q_abs[..., self.kv_lora_rank :]
            else:
                q_pe_out = torch.empty_like(q_pe)
            rot, norm = self.rotary_emb, self.kv_a_layernorm
            latent_write(batch.positions, latent, norm.weight, norm.eps, q_pe, rot.inv_freq, rot.attention_factor,
                         rot.interleaved, cache, batch.out_cache_loc, q_pe_out)  # fmt: skip
            q_pe = q_pe_out
        else:
            c, k_pe = latent.split([self.kv_lora_rank, self.rope], dim=-1)
            c = self.kv_a_layernorm(c)
            q_pe, k_pe = self.rotary_emb(batch.positions, q_pe, k_pe.unsqueeze(1))
            write_paged_kv(cache, batch.out_cache_loc, torch.cat([c, k_pe.squeeze(1)], dim=-1), kv_scale)  # fp8: quantises
        if batch.is_decode:
            out = self._decode(q_nope, q_pe, batch, cache, kv_scale, q_abs)
        else:
            out = self._extend(q_nope, q_pe, batch, cache, kv_scale)
        return self.o_proj(out.reshape(T, self.heads * self.v_dim))

    @staticmethod
    def _latent_write_kernel(latent: torch.Tensor, cache: torch.Tensor) -> Any:
        """The fused latent write (``mla_latent_write``) when it serves this cache: same dtype (an
        fp8 cache quantises through ``kv_cache_write``), and a verified kernel on a GPU (there the
        reference composite would be slower than the separate norm / rotary kernels); else None."""
        if cache.dtype != latent.dtype:
            return None
        k = kernel("mla_latent_write", latent)
        return k if k.backend != "reference" or latent.device.type == "cpu" else None

    def _extend(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        batch: ForwardBatch,
        cache: torch.Tensor,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # prefix + chunk of every sequence, packed; an fp8 cache is read back dequantised, so the
        # chunk attends to the same (quantised) latents that later decode steps will see
        latent = gather_paged_kv(cache, batch.kv_slots, kv_scale, dtype=q_nope.dtype)
        c, k_pe = latent.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c).view(-1, self.heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out, _ = kernel("mla_prefill", q, head_dim_qk=q.shape[-1], head_dim_v=self.v_dim)(
            q,
            k,
            v.contiguous(),
            batch.cu_seqlens_q,
            batch.cu_seqlens_k,
            batch.max_extend_len,
            batch.max_seq_len,
            self.scaling,
            True,
        )
        return out

    def _decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        batch: ForwardBatch,
        cache: torch.Tensor,
        kv_scale: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q``: the absorbed query with its rope columns already written (the fused latent write),
        or None: allocated here and q_pe copied in."""
        T, H, L = q_nope.shape[0], self.heads, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, L)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        # absorb W_UK into the query: per head [T, nope] @ [nope, L], written straight into the
        # latent part of q (a strided bmm output, no copy); the rotated q_pe fills the rest
        if q is None:
            q = torch.empty(T, H, L + self.rope, dtype=q_nope.dtype, device=q_nope.device)
            q[..., L:].copy_(q_pe)
        torch.bmm(q_nope.transpose(0, 1), w_uk, out=q[..., :L].transpose(0, 1))
        q = q.view(batch.batch_size, batch.q_len, H, -1)
        if cache.dtype != torch.float8_e4m3fn and cache.dtype != q.dtype:
            q = q.to(cache.dtype)  # e.g. a bf16 cache under an fp32 model: the kernels take one 16/32-bit dtype
        traits = dict(page_size=cache.shape[1], heads=self.heads, q_len=batch.q_len, head_dim=q.shape[-1])
        out, _ = kernel("mla_decode", q, kv_dtype=cache.dtype, **traits)(
            q, cache, batch.block_table, batch.seq_lens, self.scaling, True, self.kv_lora_rank, kv_scale
        )
        out = out.to(q_nope.dtype).reshape(T, H, L)
        # W_UV per head, written in the [T, heads, v] layout o_proj reads (no transpose copy)
        o = torch.empty(T, H, self.v_dim, dtype=out.dtype, device=out.device)
        torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2), out=o.transpose(0, 1))
        return o


class DeepseekV3MLP(nn.Module):
    """SwiGLU MLP split over ``group``: a dense layer's MLP (a stage) or the shared experts (inside the MoE)."""

    def __init__(self, hidden: int, intermediate: int, group: ParallelGroup, dtype: Any, device: Any):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden, [intermediate, intermediate], group, dtype=dtype, device=device
        )
        self.down_proj = RowParallelLinear(intermediate, hidden, group, dtype=dtype, device=device)
        self.spmd_in, self.spmd_out = Layout(group.name, Replicate()), Layout(group.name, Partial())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DeepseekV3Router(nn.Module):
    """Router logits (computed in fp32, as HF does) and the expert-choice bias."""

    def __init__(self, cfg: DeepseekV3Config, dtype: Any, device: Any):
        super().__init__()
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        bias = torch.zeros(E, dtype=torch.float32, device=device)
        self.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == x.dtype and _MM_OUT_DTYPE:
            # One GEMM with fp32 output: products of 16-bit values are exact in fp32 and cuBLAS
            # accumulates in fp32, so this is HF's fp32 linear without converting x and the
            # weight on every call (at batch 1 those two copies cost more than the GEMM)
            return torch.mm(x, self.weight.t(), out_dtype=torch.float32)
        return torch.nn.functional.linear(x.float(), self.weight.float())


# torch.mm(..., out_dtype=) (CUDA; torch >= 2.8)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


# Up to this many tokens the shared experts overlap the routed ones on a second stream.
SHARED_STREAM_MAX_TOKENS = 128


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def shared_experts_stream(x: torch.Tensor) -> torch.cuda.Stream | None:
    """The second stream for the shared experts of ``x``'s MoE layer, or None (CPU, a large batch,
    or ``TOKENSPEED_SHARED_EXPERTS_STREAM=0``)."""
    if not x.is_cuda or x.shape[0] > SHARED_STREAM_MAX_TOKENS or env.get(env.SHARED_EXPERTS_STREAM) == "0":
        return None
    return _side_stream(x.device)


class DeepseekV3MoE(nn.Module):
    """Shared experts + grouped top-k routed experts; stage ``Replicate@moe -> Partial@moe``."""

    def __init__(self, cfg: DeepseekV3Config, ctx: ParallelContext, fp8_experts: bool, dtype: Any, device: Any):
        super().__init__()
        self.cfg = cfg
        group = ctx.group("moe")
        self.gate = DeepseekV3Router(cfg, dtype, device)
        self.experts = FusedExperts(
            cfg.n_routed_experts,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            ctx.moe_tp_rank,
            ctx.moe_tp_size,
            ctx.moe_ep_rank,
            ctx.moe_ep_size,
            fp8=fp8_experts,
            dtype=dtype,
            device=device,
        )
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = DeepseekV3MLP(cfg.hidden_size, shared, group, dtype, device) if shared else None
        self.spmd_in, self.spmd_out = Layout(group.name, Replicate()), Layout(group.name, Partial())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = shared_experts_stream(x) if self.shared_experts is not None else None
        if side is None:
            out = self._routed(x)
            # both are partial sums over the same (moe) group, so they add before any reduction
            return out if self.shared_experts is None else out + self.shared_experts(x)
        # A decode-sized batch: the shared experts' dense GEMMs run on a second stream while the
        # routing and the routed experts' small kernels leave most SMs idle. Ordering: the side
        # stream starts after x is ready and the main stream waits for it before the add (also
        # inside a CUDA graph, where the two become parallel branches).
        main = torch.cuda.current_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            shared = self.shared_experts(x)
        out = self._routed(x)
        main.wait_stream(side)
        return out + shared

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        weights, ids = kernel("moe_route", x)(
            self.gate(x),
            c.num_experts_per_tok,
            c.scoring_func,
            self.gate.e_score_correction_bias,
            c.n_group,
            c.topk_group,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )
        return self.experts(x, weights, ids)


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(
        self, cfg: DeepseekV3Config, layer_id: int, ctx: ParallelContext, fp8_experts: bool, dtype: Any, device: Any
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.layer_id = layer_id  # also its index in the KV cache
        self.input_layernorm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, group="attn", **kw)
        self.self_attn = DeepseekV3Attention(cfg, layer_id, ctx.group("attn"), dtype, device)
        self.post_attention_layernorm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, group="attn", **kw)
        if cfg.is_moe_layer(layer_id):
            self.mlp: nn.Module = DeepseekV3MoE(cfg, ctx, fp8_experts, dtype, device)
        else:
            self.mlp = DeepseekV3MLP(cfg.hidden_size, cfg.intermediate_size, ctx.group("dense"), dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, kv: MLAKVCache):
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, kv[self.layer_id], kv.scale(self.layer_id) if hasattr(kv, "scale") else None)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def spmd_stages(self, prefix: str) -> Stages:
        names = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        return [(f"{prefix}.{n}", getattr(self, n)) for n in names]


class DeepseekV3MTPInput(nn.Module):
    """NextN input: ``eh_proj([enorm(embedding of token t+1); hnorm(main hidden of token t)])``."""

    def __init__(self, cfg: DeepseekV3Config, dtype: Any, device: Any):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, **kw)
        self.spmd_in = self.spmd_out = Layout("attn", Replicate())

    def forward(self, embeds: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(prev_hidden)], dim=-1))


class DeepseekV3MTPLayer(nn.Module):
    """One multi-token-prediction (NextN) module; shares the embedding and LM head with the main model."""

    def __init__(
        self, cfg: DeepseekV3Config, layer_id: int, ctx: ParallelContext, fp8_experts: bool, dtype: Any, device: Any
    ):
        super().__init__()
        self.input = DeepseekV3MTPInput(cfg, dtype, device)
        self.block = DeepseekV3DecoderLayer(cfg, layer_id, ctx, fp8_experts, dtype, device)
        self.final_norm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, group="attn", dtype=dtype, device=device)


class DeepseekV3ForCausalLM(CausalLM):
    """See :class:`tokenspeed_engine.models.base.CausalLM` for the call; ``forward_mtp`` runs a NextN layer.

    ``num_mtp_layers`` NextN layers are built (0 skips them); ``fp8_experts`` keeps routed experts
    in e4m3 with block scales (from a DeepSeek fp8 checkpoint). ``kv_cache_dtype`` (default: the
    model's dtype) is what ``make_kv_cache`` allocates; float8_e4m3fn halves the bytes per token.
    """

    supports_fp8_kv_cache = True  # the absorbed decode reads the e4m3 latent cache directly

    def __init__(
        self,
        config: DeepseekV3Config,
        parallel: ParallelContext | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: Any = None,
        num_mtp_layers: int = 0,
        fp8_experts: bool = False,
    ):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.kv_cache_dtype = dtype  # the latent cache's dtype: the model's, or float8_e4m3fn (set_kv_cache_dtype)
        ctx = self.parallel = parallel or ParallelContext.single()
        attn, kw = ctx.group("attn"), {"dtype": dtype, "device": device}
        embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, attn, **kw)
        layers = [
            DeepseekV3DecoderLayer(config, i, ctx, fp8_experts, dtype, device) for i in range(config.num_hidden_layers)
        ]
        norm = ResidualRMSNorm(config.hidden_size, config.rms_norm_eps, group="attn", **kw)
        self.model = DecoderModel(embed, layers, norm)
        tied = embed if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, attn, tied_to=tied, **kw)
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(
            [DeepseekV3MTPLayer(config, n + k, ctx, fp8_experts, dtype, device) for k in range(num_mtp_layers)]
        )
        self.compile_spmd()

    def spmd_chains(self) -> dict[str, tuple[Stages, Layout]]:
        chains = super().spmd_chains()
        for k, mtp in enumerate(self.mtp):
            stages = [("model.embed_tokens", self.model.embed_tokens), (f"mtp.{k}.input", mtp.input)]
            stages += mtp.block.spmd_stages(f"mtp.{k}.block")
            stages += [(f"mtp.{k}.final_norm", mtp.final_norm), ("lm_head", self.lm_head)]
            chains[f"mtp{k}"] = (stages, LOGITS_LAYOUT)
        return chains

    def make_kv_cache(self, num_pages: int, page_size: int, device: Any = None) -> MLAKVCache:
        """Latent caches for the main layers and then the MTP layers (page 0 included, never handed out)."""
        dim = self.config.kv_lora_rank + self.config.qk_rope_head_dim
        device = device or self.lm_head.weight.device
        layers = self.config.num_hidden_layers + len(self.mtp)
        return MLAKVCache(layers, num_pages, page_size, dim, self.kv_cache_dtype, device)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token takes on this rank over all layers (for sizing the page pool):
        layers x 576 (DeepSeek) x bytes per value (1 with an fp8 cache)."""
        dim = self.config.kv_lora_rank + self.config.qk_rope_head_dim
        return (self.config.num_hidden_layers + len(self.mtp)) * dim * self.kv_cache_dtype.itemsize

    def forward_mtp(
        self,
        batch: ForwardBatch,
        kv_cache: MLAKVCache,
        prev_hidden: torch.Tensor,
        layer: int = 0,
        return_all_logits: bool = False,
        return_hidden: bool = False,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draft with NextN layer ``layer``: token t+1's ids in ``batch`` with the main model's final
        hidden state of token t (``prev_hidden`` [T, hidden], rows aligned with ``batch.input_ids``).

        Positions may be either token's (RoPE is relative; keep one convention per sequence).
        The layer's KV lives in ``kv_cache[num_hidden_layers + layer]``. ``logit_rows`` (int64,
        on the device) picks the token rows that get logits, in that order (speculative
        decoding needs the row after each request's last accepted token, not its last row).
        """
        if not 0 <= layer < len(self.mtp):
            raise IndexError(f"MTP layer {layer} not loaded (this model has {len(self.mtp)})")
        mtp = self.mtp[layer]
        x = mtp.input(self.model.embed_tokens(batch.input_ids), prev_hidden)
        x, residual = mtp.block(x, None, batch, kv_cache)
        hidden = mtp.final_norm(x, residual)[0]
        if logit_rows is not None:
            logits = self.lm_head(hidden.index_select(0, logit_rows))[..., : self.config.vocab_size]
        else:
            logits = self.compute_logits(hidden, batch, return_all_logits)
        return (logits, hidden) if return_hidden else logits
