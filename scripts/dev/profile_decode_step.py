"""Where a decode step's time goes (batch 1 by default): kernels per step, GPU time per step, the top kernels.

The agentic benchmark's batch-1 decode of the Moonlight-shaped model runs at 25% of the
bandwidth roofline (7-8 ms per step where the weights stream in 1.8 ms). This profiles the
decode steps of that model through the engine, eager (the same kernels a graph replays,
each visible) and with graphs (wall time), and prints per step:
  * number of kernels, their summed GPU time, and the wall time;
  * the top kernels by total time, with how many launches per step each has;
  * the gaps: wall time minus GPU time (launch overhead where eager, idle bubbles in a graph).

    python scripts/dev/profile_decode_step.py [--layers N] [--steps S] [--batch B] [--json PATH]
    python scripts/dev/profile_decode_step.py --tiny --device cpu   # checks the script without a GPU
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.random_moonlight import IdTokenizer, moonlight_config  # noqa: E402
from tokenspeed_engine.engine import Engine, EngineConfig  # noqa: E402
from tokenspeed_engine.model_runner import TorchModelRunner  # noqa: E402
from tokenspeed_engine.models.configs import build_random_model  # noqa: E402
from tokenspeed_engine.sampling import SamplingParams  # noqa: E402
from tokenspeed_kernels import env  # noqa: E402

PAGE = 64
MAX_LEN = 8192


def make_runner(model, device: str, graphs: int, batch: int = 1) -> TorchModelRunner:
    pages = batch * (MAX_LEN // PAGE) + 1
    kv = model.make_kv_cache(pages, PAGE, device=device)
    return TorchModelRunner(model, kv, num_pages=pages, page_size=PAGE, max_model_len=MAX_LEN,
                            vocab_size=model.config.vocab_size, device=device, cuda_graph_max_bs=graphs)  # fmt: skip


def decode_engine(runner: TorchModelRunner, vocab: int, context: int, batch: int = 1) -> Engine:
    """``batch`` requests, prefilled and past their first decode steps: every later step is a batch-``batch`` decode."""
    budget = 8192
    e = Engine(runner, IdTokenizer(), set(), EngineConfig(budget, max(4, batch), enable_overlap=False))
    gen = torch.Generator().manual_seed(0)
    for rid in range(batch):
        prompt = torch.randint(1, vocab, (context,), generator=gen).tolist()
        e.add_request(rid, prompt, SamplingParams(max_tokens=MAX_LEN - context - 1, temperature=0.0, ignore_eos=True))
    for _ in range(-(-batch * context // budget) + 4):  # the prefill chunks, then a few decode steps
        e.step()
    return e


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_ms_per_step(e: Engine, steps: int, device: str) -> float:
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        e.step()
    synchronize(device)
    return (time.perf_counter() - t) / steps * 1e3


def kernel_table(e: Engine, steps: int, device: str) -> dict:
    """Kernels (CUDA) or top-level ops (CPU) of ``steps`` decode steps."""
    acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    synchronize(device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            e.step()
        synchronize(device)
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for ev in prof.events():
        if device == "cuda" and ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            per_name[ev.name].append(ev.device_time / 1e3)  # us -> ms
        elif device == "cpu" and ev.name.startswith(("aten::", "tokenspeed::")) and ev.cpu_parent is None:
            per_name[ev.name].append(ev.cpu_time_total / 1e3)
    total = sum(sum(v) for v in per_name.values())
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    return {
        "kernels_per_step": sum(len(v) for v in per_name.values()) / steps,
        "busy_ms_per_step": total / steps,
        "top": [{"name": n[:90], "per_step": len(v) / steps, "ms_per_step": sum(v) / steps} for n, v in rows[:30]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="Moonlight layers (default: all 27)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--context", type=int, default=4000, help="prompt tokens before the decode steps")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, narrow model (checks the script on CPU)")
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    b = args.batch

    cfg = moonlight_config(args.tiny, args.layers)
    model = build_random_model(cfg, dtype=torch.bfloat16, device=args.device, seed=1)
    report: dict = {"layers": cfg.num_hidden_layers, "context": args.context, "batch": b}
    with torch.inference_mode():
        eager = decode_engine(make_runner(model, args.device, 0, b), cfg.vocab_size, args.context, b)
        report["eager_wall_ms"] = wall_ms_per_step(eager, args.steps, args.device)
        report["eager"] = kernel_table(eager, args.steps, args.device)
        del eager
        if args.device == "cuda":
            graphed = decode_engine(make_runner(model, args.device, b, b), cfg.vocab_size, args.context, b)
            report["graph_wall_ms"] = wall_ms_per_step(graphed, args.steps, args.device)
            del graphed
            # the same with the shared experts on the main stream (the A/B of the second stream)
            os.environ[env.SHARED_EXPERTS_STREAM] = "0"
            graphed = decode_engine(make_runner(model, args.device, b, b), cfg.vocab_size, args.context, b)
            report["graph_wall_ms_one_stream"] = wall_ms_per_step(graphed, args.steps, args.device)
            del graphed
            os.environ.pop(env.SHARED_EXPERTS_STREAM)

    k = report["eager"]
    print(f"Moonlight-shaped, {cfg.num_hidden_layers} layers, batch {b} decode at ~{args.context} tokens, {args.device}")
    print(f"kernels/step {k['kernels_per_step']:.0f} ({k['kernels_per_step'] / cfg.num_hidden_layers:.1f} per layer), "
          f"GPU busy {k['busy_ms_per_step']:.2f} ms/step, eager wall {report['eager_wall_ms']:.2f} ms, "
          f"graph wall {report.get('graph_wall_ms', float('nan')):.2f} ms "
          f"(shared experts on the main stream: {report.get('graph_wall_ms_one_stream', float('nan')):.2f} ms)")  # fmt: skip
    print(f"{'ms/step':>8} | {'launches/step':>13} | kernel")
    for r in k["top"]:
        print(f"{r['ms_per_step']:8.3f} | {r['per_step']:13.1f} | {r['name']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
