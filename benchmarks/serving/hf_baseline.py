"""The no-engine baseline: Hugging Face transformers ``generate()`` on the same model directory, one user.

Replays the first turns of one conversation in process (no server, no prefix cache: every turn
recomputes its whole prompt, as a plain ``generate`` call does), timing each generated token with
a streamer. Tokens/s per user = 1000 / mean TPOT ms, as for the served runs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.serving.trace import Conversation, TokenSynth

DTYPES = ("bfloat16", "float16", "float32")


class _TimingStreamer:
    """Records when each generated token reaches the host (``generate`` moves it there to stream)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first streams the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def load_hf_model(model_dir: str, device: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    try:  # straight onto the device (needs accelerate); else through host memory
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, device_map=device)
    except (ImportError, ValueError):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
    model = model.eval()
    gc = model.generation_config
    if gc.pad_token_id is None:
        gc.pad_token_id = gc.eos_token_id if isinstance(gc.eos_token_id, int) else 0
    return model


def generate_timed(model: Any, prompt: list[int], n: int) -> dict[str, Any]:
    """Greedy-generate exactly ``n`` tokens (EOS suppressed by min_new_tokens); TTFT, TPOT and the ids."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    streamer = _TimingStreamer()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = streamer.times
    tpot = (times[-1] - times[0]) / (len(streamer.tokens) - 1) if len(streamer.tokens) > 1 else None
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(streamer.tokens),
        "ttft_ms": (times[0] - t0) * 1e3,
        "tpot_ms": tpot * 1e3 if tpot else None,
        "output_ids": streamer.tokens,
    }


def run_hf_baseline(
    model_dir: str, conv: Conversation, synth: TokenSynth, turns: int, device: str = "cuda", dtype: str = "bfloat16"
) -> dict[str, Any]:
    """One user through ``turns`` turns of ``conv``; the results JSON's ``hf_baseline``."""
    import torch
    import transformers

    if conv.messages is not None:
        raise ValueError("the HF baseline replays lengths conversations (token ids), not OpenAI messages")
    if turns < 1:
        raise ValueError(f"--hf-turns must be >= 1, got {turns}")
    t_load = time.perf_counter()
    model = load_hf_model(model_dir, device, dtype)
    load_s = time.perf_counter() - t_load
    generate_timed(model, synth.ids(("hf-warmup",), 16), 4)  # one-time costs: kernels, allocator, caches
    history: list[int] = []
    per_turn = []
    for t in range(min(turns, len(conv.turns))):
        prompt = history + synth.new_tokens(conv, t, "hf")
        res = generate_timed(model, prompt, conv.turns[t].output_tokens)
        history = prompt + res.pop("output_ids")
        per_turn.append({"turn": t, **res})
    tpots = [r["tpot_ms"] for r in per_turn if r["tpot_ms"]]
    mean_tpot = float(np.mean(tpots)) if tpots else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and device.startswith("cuda") else None
    return {
        "backend": "hf",
        "model": model_dir,
        "transformers": transformers.__version__,
        "device": device,
        "dtype": dtype,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "load_s": load_s,
        "turns": per_turn,
        "mean_tpot_ms": mean_tpot,
        "tokens_per_s_per_user": 1000.0 / mean_tpot if mean_tpot else None,
        "ttft_ms_mean": float(np.mean([r["ttft_ms"] for r in per_turn])),
        "peak_gpu_gib": peak,
    }
