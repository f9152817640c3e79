"""Our DeepSeek-V3 parameters in Hugging Face transformers' in-memory naming (single rank).

Used to build an independent reference (HF's modules, no tokenspeed ops) from the same
weights, e.g. for a randomly initialised model on a GPU (``scripts/check_model_device.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from tokenspeed_engine.loader.fp8 import dequantize_block_fp8


def _split_gate_up(name: str, w: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    gate, up = w.chunk(2, dim=0)
    yield name.replace(".gate_up_proj.", ".gate_proj."), gate
    yield name.replace(".gate_up_proj.", ".up_proj."), up


def _experts(module: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if module.w13.dtype != torch.float8_e4m3fn:
        return module.w13.to(dtype), module.w2.to(dtype)
    deq = [
        torch.stack([dequantize_block_fp8(w[e], s[e], dtype=dtype) for e in range(w.shape[0])])
        for w, s in ((module.w13, module.w13_scale), (module.w2, module.w2_scale))
    ]
    return deq[0], deq[1]


def hf_layer_state_dict(
    model: torch.nn.Module, layer: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """HF ``DeepseekV3DecoderLayer`` state dict of main layer ``layer`` (names relative to the layer)."""
    if model.parallel.world_size != 1:
        raise ValueError("hf_layer_state_dict needs an unsharded (single-rank) model")
    mod = model.model.layers[layer]
    out: dict[str, torch.Tensor] = {}
    for name, p in mod.named_parameters():
        if ".experts." in name:
            continue
        if ".gate_up_proj." in name:
            out.update({k: v.to(dtype) for k, v in _split_gate_up(name, p)})
        else:
            out[name] = p.to(dtype)
    if hasattr(mod.mlp, "experts"):
        w13, w2 = _experts(mod.mlp.experts, dtype)
        out["mlp.experts.gate_up_proj"], out["mlp.experts.down_proj"] = w13, w2
        out["mlp.gate.e_score_correction_bias"] = mod.mlp.gate.e_score_correction_bias.float()
    return out


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Full ``DeepseekV3ForCausalLM`` state dict (main model, no MTP) in HF naming."""
    out = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight.to(dtype),
        "model.norm.weight": model.model.norm.weight.to(dtype),
        "lm_head.weight": model.lm_head.weight.to(dtype),
    }
    for i in range(len(model.model.layers)):
        out.update({f"model.layers.{i}.{k}": v for k, v in hf_layer_state_dict(model, i, dtype).items()})
    return out


@torch.no_grad()
def hf_reference_logits(
    model: torch.nn.Module,
    tokens: list[int],
    dtype: torch.dtype = torch.float32,
    on_layer: Callable[[int, torch.nn.Module], None] | None = None,
) -> torch.Tensor:
    """Logits [len(tokens), vocab] of a full causal forward through transformers' DeepSeek-V3 modules.

    Layers are built one at a time from this model's weights (cast to ``dtype``; an fp32 model's
    weights are used in place) on its device. No tokenspeed op runs: attention is HF's eager
    (non-absorbed) MLA, experts HF's loop. ``on_layer(i, hf_layer)`` runs before each layer
    (e.g. to hook its router).
    """
    import torch.nn.functional as F
    from transformers import DeepseekV3Config as HFConfig
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    cfg = HFConfig(**model.config.to_hf())
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    device = model.lm_head.weight.device
    ids = torch.tensor([tokens], device=device)
    h = F.embedding(ids, model.model.embed_tokens.weight.to(dtype))
    positions = torch.arange(len(tokens), device=device)[None]
    position_embeddings = hf.DeepseekV3RotaryEmbedding(cfg).to(device)(h, positions)
    mask = torch.full((len(tokens), len(tokens)), float("-inf"), device=device).triu(1)[None, None].to(dtype)
    for i in range(len(model.model.layers)):
        with torch.device("meta"):
            layer = hf.DeepseekV3DecoderLayer(cfg, i)
        layer.load_state_dict(hf_layer_state_dict(model, i, dtype), strict=True, assign=True)
        if on_layer is not None:
            on_layer(i, layer)
        out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings)
        h = out[0] if isinstance(out, tuple) else out
        del layer
    norm = hf.DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps).to(device=device, dtype=dtype)
    norm.weight.copy_(model.model.norm.weight.to(dtype))
    return F.linear(norm(h), model.lm_head.weight.to(dtype))[0]
