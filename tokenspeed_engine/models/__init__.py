"""Models and their loading: ``load_model(path, ...)`` dispatches on config.json ``architectures``.

Supported: ``DeepseekV3ForCausalLM`` (safetensors, bf16 or DeepSeek fp8 block-scale; NextN/MTP
layers) and ``LlamaForCausalLM`` (safetensors or a ``.gguf`` file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tokenspeed_engine.loader.weights import load_weights
from tokenspeed_engine.models.base import CausalLM
from tokenspeed_engine.models.configs import DeepseekV3Config, LlamaConfig
from tokenspeed_engine.spmd.groups import ParallelContext

SUPPORTED = ("DeepseekV3ForCausalLM", "LlamaForCausalLM")


class UnknownArchitectureError(ValueError):
    """config.json names an architecture this package does not implement."""


def config_from_hf(d: dict[str, Any]) -> DeepseekV3Config | LlamaConfig:
    """The model config of an HF config.json dict; UnknownArchitectureError if unsupported."""
    archs = d.get("architectures") or []
    for arch in archs:
        if arch == "DeepseekV3ForCausalLM":
            return DeepseekV3Config.from_hf(d)
        if arch == "LlamaForCausalLM":
            return LlamaConfig.from_hf(d)
    raise UnknownArchitectureError(
        f"unknown architecture {archs or d.get('model_type')!r}: supported are {', '.join(SUPPORTED)}"
    )


def build_model(
    config: DeepseekV3Config | LlamaConfig,
    dtype: torch.dtype = torch.bfloat16,
    device: Any = None,
    parallel: ParallelContext | None = None,
    num_mtp_layers: int = 0,
    fp8_experts: bool = False,
) -> CausalLM:
    """An uninitialised model of ``config`` on ``device`` (weights to be loaded or randomised)."""
    from tokenspeed_engine.models.deepseek_v3 import DeepseekV3ForCausalLM
    from tokenspeed_engine.models.llama import LlamaForCausalLM

    if isinstance(config, DeepseekV3Config):
        model: CausalLM = DeepseekV3ForCausalLM(config, parallel, dtype, device, num_mtp_layers, fp8_experts)
    elif isinstance(config, LlamaConfig):
        model = LlamaForCausalLM(config, parallel, dtype, device)
    else:
        raise UnknownArchitectureError(f"no model for config type {type(config).__name__}")
    return model.eval()


def _gguf_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
    return None


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    parallel: ParallelContext | None = None,
    load_mtp: bool | None = None,
    fp8_experts: bool | None = None,
    progress: bool = True,
) -> CausalLM:
    """Build the model a checkpoint describes and load its weights, sharded for ``parallel``.

    Args:
        path: an HF checkpoint directory (config.json + safetensors, sharded or not) or a
            Llama ``.gguf`` file (or a directory holding exactly one).
        dtype: activation / weight dtype (fp8 checkpoints are dequantised to it, experts aside).
        device: default CUDA if available, else CPU.
        parallel: this rank's groups (None: a single process).
        load_mtp: DeepSeek NextN layers: None loads those present in the checkpoint, True
            requires ``num_nextn_predict_layers`` of them, False skips them.
        fp8_experts: keep routed experts in fp8 (None: when the checkpoint is fp8 and the
            per-rank sizes are multiples of 128).
        progress: show a tqdm bar on stderr.
    """
    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gguf_path = _gguf_file(path)
    if gguf_path is not None:
        from tokenspeed_engine.loader.gguf_reader import GGUFCheckpoint
        from tokenspeed_engine.models.llama import LlamaWeightMapper

        ckpt: Any = GGUFCheckpoint(gguf_path)
        config = config_from_hf(ckpt.config)
        model = build_model(config, dtype, device, parallel)
        load_weights(model, ckpt, LlamaWeightMapper(config), dtype, progress=progress)
        return model
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (and not a .gguf file)")
    from tokenspeed_engine.loader.safetensors_reader import SafetensorsCheckpoint

    config = config_from_hf(json.loads((path / "config.json").read_text()))
    ckpt = SafetensorsCheckpoint(path)
    if isinstance(config, LlamaConfig):
        from tokenspeed_engine.models.llama import LlamaWeightMapper

        model = build_model(config, dtype, device, parallel)
        load_weights(model, ckpt, LlamaWeightMapper(config), dtype, progress=progress)
        return model
    return _load_deepseek(config, ckpt, dtype, device, parallel, load_mtp, fp8_experts, progress)


def _load_deepseek(
    config: DeepseekV3Config,
    ckpt: Any,
    dtype: torch.dtype,
    device: torch.device,
    parallel: ParallelContext | None,
    load_mtp: bool | None,
    fp8_experts: bool | None,
    progress: bool,
) -> CausalLM:
    from tokenspeed_engine.models.deepseek_v3_weights import DeepseekV3WeightMapper

    quant = config.quantization_config or {}
    is_fp8 = quant.get("quant_method") == "fp8"
    if quant and not is_fp8:
        raise NotImplementedError(f"quantization {quant.get('quant_method')!r} (only DeepSeek fp8 is supported)")
    block = tuple(quant.get("weight_block_size", (128, 128)))
    ctx = parallel or ParallelContext.single()
    if fp8_experts is None:
        inter = config.moe_intermediate_size // ctx.moe_tp_size
        fp8_experts = is_fp8 and block == (128, 128) and config.hidden_size % 128 == 0 and inter % 128 == 0
    elif fp8_experts and not is_fp8:
        raise ValueError("fp8_experts=True needs an fp8 checkpoint")
    n, wanted = config.num_hidden_layers, config.num_nextn_predict_layers
    present = 0
    while present < wanted and ckpt.has(f"model.layers.{n + present}.eh_proj.weight"):
        present += 1
    if load_mtp and wanted == 0:
        raise ValueError("load_mtp=True but the config has num_nextn_predict_layers = 0")
    num_mtp = wanted if load_mtp else (present if load_mtp is None else 0)
    model = build_model(config, dtype, device, ctx, num_mtp, fp8_experts)
    load_weights(model, ckpt, DeepseekV3WeightMapper(config, num_mtp), dtype, block, progress)
    return model


__all__ = ["SUPPORTED", "UnknownArchitectureError", "build_model", "config_from_hf", "load_model"]
