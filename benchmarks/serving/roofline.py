"""A roofline model of agentic decoding on a DeepSeek-V3-shaped model (MLA + MoE), from its config.json.

Per decode step at batch b, each sequence holding c tokens of context (c from the trace):
* bytes = weights read (attention, dense MLPs, router, shared experts, LM head, and the routed
  experts the batch touches: E * (1 - (1 - k/E)^b) of E per MoE layer, routing taken as uniform)
  + KV read: (kv_lora_rank + qk_rope_head_dim) * kv_bytes * layers * b * c (MLA's latent cache);
* FLOPs = 2 * active parameters per token * b + absorbed MLA attention
  2 * b * c * layers * heads * (2 * kv_lora_rank + qk_rope_head_dim), plus, for the workload
  roofline, the prefills that the trace requires per generated token (2 * active parameters per
  prefilled token and the causal attention pairs at head dims qk_head_dim + v_head_dim);
* time = max(bytes / copy bandwidth, FLOPs / matrix rate), one token per sequence per step.
Per-user tokens/s = 1 / time; TPM per GPU = 60 * b / time / GPUs (weights and KV split evenly).
The batch is capped by the KV that fits beside the weights when a memory size is given.

    python -m benchmarks.serving.roofline --model DIR [--measure | --copy-gbps 3000 --matmul-tflops 700] [--context 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.serving.trace import WorkloadShape

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "fp8": 1}


@dataclass
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    moe_layers: int
    intermediate: int
    moe_intermediate: int
    routed_experts: int
    top_k: int
    shared_experts: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    weight_bytes: float = 2.0  # per weight of the dense layers
    expert_weight_bytes: float = 2.0  # per routed-expert weight (1 for fp8 experts)
    kv_bytes: float = 2.0  # per latent-cache element
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, d: dict[str, Any], name: str = "model") -> ModelShape:
        """From a DeepSeek-V3 style config.json dict."""
        need = (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "vocab_size",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
        )
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"config of {name} lacks {missing}: not a DeepSeek-V3 shaped model")
        layers = int(d["num_hidden_layers"])
        experts = int(d.get("n_routed_experts") or 0)
        first_dense, freq = int(d.get("first_k_dense_replace", 0)), int(d.get("moe_layer_freq", 1) or 1)
        moe_layers = sum(1 for i in range(layers) if experts > 0 and i >= first_dense and i % freq == 0)
        dtype = str(d.get("torch_dtype") or d.get("dtype") or "bfloat16").replace("torch.", "")
        wb = float(DTYPE_BYTES.get(dtype, 2))
        quant = d.get("quantization_config") or {}
        ewb = 1.0 if quant.get("quant_method") == "fp8" else wb
        if quant.get("quant_method") == "fp8":
            wb = 1.0
        return cls(
            name=name,
            layers=layers,
            hidden=int(d["hidden_size"]),
            heads=int(d["num_attention_heads"]),
            vocab=int(d["vocab_size"]),
            moe_layers=moe_layers,
            intermediate=int(d.get("intermediate_size", 0)),
            moe_intermediate=int(d.get("moe_intermediate_size", 0)),
            routed_experts=experts,
            top_k=int(d.get("num_experts_per_tok") or 0),
            shared_experts=int(d.get("n_shared_experts") or 0),
            kv_lora_rank=int(d["kv_lora_rank"]),
            q_lora_rank=d.get("q_lora_rank"),
            qk_nope_head_dim=int(d["qk_nope_head_dim"]),
            qk_rope_head_dim=int(d["qk_rope_head_dim"]),
            v_head_dim=int(d["v_head_dim"]),
            weight_bytes=wb,
            expert_weight_bytes=ewb,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelShape:
        """A model directory (its config.json) or a config.json file."""
        p = Path(path)
        cfg = p / "config.json" if p.is_dir() else p
        if not cfg.is_file():
            raise FileNotFoundError(f"--roofline-model {path}: no config.json")
        return cls.from_config(json.loads(cfg.read_text()), name=p.name if p.is_dir() else p.parent.name)

    # ---- parameter counts ------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attention_params(self) -> int:
        """One layer's MLA projections (norm weights are negligible)."""
        h, n = self.hidden, self.heads
        q = h * n * self.qk_head_dim if not self.q_lora_rank else h * self.q_lora_rank + self.q_lora_rank * n * self.qk_head_dim
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + n * self.v_head_dim * h

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    @property
    def dense_params_per_token(self) -> int:
        """Weights every token reads except the routed experts (embedding lookup aside)."""
        dense_mlp = 3 * self.hidden * self.intermediate
        per_moe = self.hidden * self.routed_experts + self.shared_experts * self.expert_params
        return (
            self.layers * self.attention_params
            + (self.layers - self.moe_layers) * dense_mlp
            + self.moe_layers * per_moe
            + self.vocab * self.hidden
        )

    @property
    def active_params_per_token(self) -> int:
        return self.dense_params_per_token + self.moe_layers * self.top_k * self.expert_params

    @property
    def total_weight_bytes(self) -> float:
        embed = 0 if self.tie_word_embeddings else self.vocab * self.hidden
        return (
            self.dense_params_per_token + embed
        ) * self.weight_bytes + self.moe_layers * self.routed_experts * self.expert_params * self.expert_weight_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_bytes * self.layers

    # ---- one decode step -------------------------------------------------------------
    def distinct_experts(self, batch: float) -> float:
        """Expected routed experts a batch touches per MoE layer (uniform, independent routing)."""
        if self.routed_experts == 0:
            return 0.0
        return self.routed_experts * (1.0 - (1.0 - self.top_k / self.routed_experts) ** batch)

    def weight_bytes_read(self, batch: float) -> float:
        routed = self.moe_layers * self.distinct_experts(batch) * self.expert_params * self.expert_weight_bytes
        return self.dense_params_per_token * self.weight_bytes + routed + batch * self.hidden * self.weight_bytes

    def kv_bytes_read(self, batch: float, context: float) -> float:
        return self.kv_bytes_per_token * batch * context

    def decode_flops(self, batch: float, context: float) -> float:
        attn = 2.0 * batch * context * self.layers * self.heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return 2.0 * batch * self.active_params_per_token + attn

    def prefill_flops_per_output(self, work: WorkloadShape) -> float:
        attn = 2.0 * work.prefill_pairs_per_output * self.layers * self.heads * (self.qk_head_dim + self.v_head_dim)
        return 2.0 * work.prefill_tokens_per_output * self.active_params_per_token + attn


@dataclass
class Hardware:
    copy_gbps: float  # bytes read + written per second / 1e9, of a device-to-device copy
    matmul_tflops: float  # dense bf16 matmul
    memory_bytes: float | None = None  # for the KV cap on the batch
    memory_utilization: float = 0.9
    source: str = "given"

    def validate(self) -> None:
        if not self.copy_gbps > 0 or not self.matmul_tflops > 0:
            raise ValueError(
                f"copy bandwidth and matmul rate must be > 0 (got {self.copy_gbps} GB/s, {self.matmul_tflops} TFLOP/s)"
            )


def measure_hardware() -> Hardware:
    """A quick copy and matmul probe on the current CUDA device (benchmarks/common.py's)."""
    import torch

    from benchmarks.common import measure_copy_gbps, measure_matmul_tflops

    if not torch.cuda.is_available():
        raise RuntimeError("--measure-roofline needs a CUDA device; pass --copy-gbps and --matmul-tflops instead")
    total = torch.cuda.get_device_properties(0).total_memory
    return Hardware(
        measure_copy_gbps(nbytes=1 << 30, reps=10),
        measure_matmul_tflops(n=8192, reps=10),
        float(total),
        source=f"measured on {torch.cuda.get_device_name(0)}",
    )


def step_time(m: ModelShape, hw: Hardware, batch: int, context: float, extra_flops: float = 0.0, gpus: int = 1) -> dict:
    bytes_ = m.weight_bytes_read(batch) + m.kv_bytes_read(batch, context)
    flops = m.decode_flops(batch, context) + extra_flops
    t_mem, t_math = bytes_ / (hw.copy_gbps * 1e9 * gpus), flops / (hw.matmul_tflops * 1e12 * gpus)
    return {"bytes": bytes_, "flops": flops, "time_s": max(t_mem, t_math), "bound": "memory" if t_mem >= t_math else "compute"}


def max_batch(m: ModelShape, hw: Hardware, context: float, gpus: int = 1) -> int | None:
    """Sequences whose KV fits beside the weights (None without a memory size)."""
    if hw.memory_bytes is None:
        return None
    free = hw.memory_bytes * hw.memory_utilization * gpus - m.total_weight_bytes
    return max(0, int(free // (m.kv_bytes_per_token * max(context, 1.0))))


def frontier(
    m: ModelShape, hw: Hardware, work: WorkloadShape, gpus: int = 1, include_prefill: bool = True, batch_limit: int = 4096
) -> list[dict[str, Any]]:
    """Roofline points along the batch size: per-user tokens/s and TPM/GPU (memory-capped)."""
    hw.validate()
    cap = max_batch(m, hw, work.mean_decode_context, gpus)
    top = batch_limit if cap is None else min(batch_limit, cap)
    # every batch up to 64, then 10% steps (the curve is smooth there)
    batches = sorted(set(range(1, min(top, 64) + 1)) | {round(1.1**i) for i in range(200) if 64 < 1.1**i <= top} | {top})
    pre = m.prefill_flops_per_output(work) if include_prefill else 0.0
    out = []
    for b in batches:
        if b < 1:
            continue
        st = step_time(m, hw, b, work.mean_decode_context, extra_flops=b * pre, gpus=gpus)
        out.append(
            {
                "batch": b,
                "tokens_per_s_per_user": 1.0 / st["time_s"],
                "tpm_per_gpu": 60.0 * b / st["time_s"] / gpus,
                "bound": st["bound"],
            }
        )
    return out


def batch1_decode(m: ModelShape, hw: Hardware, context: float) -> dict[str, Any]:
    """Bandwidth roofline of one sequence's decode: (active weights + KV) bytes per token / copy bandwidth."""
    bytes_ = m.weight_bytes_read(1) + m.kv_bytes_read(1, context)
    return {
        "context_tokens": context,
        "bytes_per_token": bytes_,
        "weight_bytes": m.weight_bytes_read(1),
        "kv_bytes": m.kv_bytes_read(1, context),
        "copy_gbps": hw.copy_gbps,
        "tokens_per_s": hw.copy_gbps * 1e9 / bytes_,
    }


def summary(m: ModelShape, hw: Hardware, work: WorkloadShape, gpus: int = 1) -> dict[str, Any]:
    """Everything the results JSON records of the roofline."""
    return {
        "model": asdict(m),
        "hardware": asdict(hw),
        "workload": asdict(work),
        "gpus": gpus,
        "active_params_per_token": m.active_params_per_token,
        "total_weight_bytes": m.total_weight_bytes,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "max_batch_by_memory": max_batch(m, hw, work.mean_decode_context, gpus),
        "prefill_flops_per_output_token": m.prefill_flops_per_output(work),
        "batch1_decode": batch1_decode(m, hw, work.mean_decode_context),
        "frontier": frontier(m, hw, work, gpus, include_prefill=True),
        "frontier_decode_only": frontier(m, hw, work, gpus, include_prefill=False),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory or config.json (DeepSeek-V3 shaped)")
    ap.add_argument("--copy-gbps", type=float, default=None)
    ap.add_argument("--matmul-tflops", type=float, default=None)
    ap.add_argument("--measure", action="store_true", help="probe the current CUDA device")
    ap.add_argument("--memory-gib", type=float, default=None, help="GPU memory, for the KV cap on the batch")
    ap.add_argument("--context", type=float, default=8192, help="KV tokens per sequence")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    m = ModelShape.from_path(args.model)
    if args.measure:
        hw = measure_hardware()
    elif args.copy_gbps and args.matmul_tflops:
        hw = Hardware(args.copy_gbps, args.matmul_tflops)
    else:
        ap.error("pass --measure or both --copy-gbps and --matmul-tflops")
    if args.memory_gib:
        hw.memory_bytes = args.memory_gib * 2**30
    work = WorkloadShape(args.context, 0.0, 0.0, int(args.context))
    res = summary(m, hw, work, args.gpus)
    b1 = res["batch1_decode"]
    print(
        f"{m.name}: {m.active_params_per_token / 1e9:.2f} B active params/token, {m.total_weight_bytes / 2**30:.1f} GiB "
        f"weights, {m.kv_bytes_per_token / 1024:.1f} KiB KV/token; {hw.copy_gbps:.0f} GB/s, {hw.matmul_tflops:.0f} TFLOP/s"
    )
    print(
        f"batch-1 decode roofline at {args.context:.0f} tokens: {b1['tokens_per_s']:.1f} tokens/s "
        f"({b1['bytes_per_token'] / 1e9:.2f} GB/token)"
    )
    print("| batch | tokens/s/user | TPM/GPU | bound |")
    for p in res["frontier_decode_only"]:
        if p["batch"] in (1, 2, 4, 8, 16, 32, 64) or p is res["frontier_decode_only"][-1]:
            print(f"| {p['batch']} | {p['tokens_per_s_per_user']:.1f} | {p['tpm_per_gpu']:.0f} | {p['bound']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
