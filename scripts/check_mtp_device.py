"""Device check of MTP speculative decoding on a Moonlight-16B-A3B-shaped model (issue 9).

The model: the Moonlight shape (27 layers, hidden 2048, 64 routed experts top-6 + 2 shared,
kv_lora_rank 512, 16 heads, vocabulary 163840) plus one NextN (MTP) layer, random bf16
weights, then ``make_perfect_draft_``: on a subset of 1024 tokens the target's next token is a
fixed function of the current one and the MTP layer computes the same function, so every
draft is right (attention, MoE and the MTP block still run on random weights).

    python scripts/check_mtp_device.py                  # cuda, the Moonlight shape
    python scripts/check_mtp_device.py --device cpu --small   # a dry run of the code paths

Checks, through the engine (scheduler, speculative step, sampler, detokeniser):
  * greedy identity: 4 requests, k = 0 (eager) vs k = 3 (eager) vs k = 3 (CUDA graphs of the
    verify and MTP forwards); all tokens must be equal, and the k = 3 acceptance length 4.0;
  * first, k = 0 vs k = 3 (eager, 32 tokens) on the random model *without* the perfect-draft
    weights (drafts almost never right): identity reported; a bf16 near-tie between the q_len 1
    and q_len 4 kernels may flip a token of a random model, so it is informational;
  * tokens/s per user at batch 1 (one request, 256 new tokens, decode phase only):
    k = 0 eager, k = 0 with the runner's decode graphs and overlap, k = 3 eager, k = 3 graphs.
Prints a table last; exit 1 if a hard check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys
import time

import torch

from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.model_runner import TorchModelRunner
from tokenspeed_engine.models.configs import DeepseekV3Config, moonlight_16b_a3b_config
from tokenspeed_engine.models.deepseek_mtp import build_random_mtp_model, make_perfect_draft_
from tokenspeed_engine.sampling import SamplingParams

PAGE = 64
MAX_LEN = 2048
ROWS: list[tuple[str, str, bool | None]] = []


def row(check: str, result: str, ok: bool | None) -> None:
    ROWS.append((check, result, ok))
    verdict = "info" if ok is None else ("ok" if ok else "FAIL")
    print(f"{check:44} {result:58} {verdict}", flush=True)


class IdTokenizer:
    def encode(self, text: str) -> list[int]:
        return [int(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{i} " for i in ids)


def small_config() -> DeepseekV3Config:
    return dataclasses.replace(
        moonlight_16b_a3b_config(), vocab_size=4099, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
    )  # fmt: skip


def make_engine(model, device: torch.device, k: int, graphs: bool, overlap: bool = False, max_bs: int = 4) -> Engine:
    pages = 4 * (MAX_LEN // PAGE + 2) + 1
    kv = model.make_kv_cache(pages, PAGE, device=device)
    runner = TorchModelRunner(
        model,
        kv,
        num_pages=pages,
        page_size=PAGE,
        max_model_len=MAX_LEN,
        vocab_size=model.config.vocab_size,
        device=device,
        cuda_graph_max_bs=max_bs if graphs and k == 0 and device.type == "cuda" else 0,
    )
    config = EngineConfig(
        4096, 8, enable_overlap=overlap, speculative_num_steps=k, speculative_graph_max_bs=max_bs if graphs and k else 0
    )
    return Engine(runner, IdTokenizer(), set(), config)


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[dict[int, list[int]], float, int]:
    """Greedy tokens per request, and the decode-phase seconds and steps (after the first token)."""
    for rid, p in enumerate(prompts):
        engine.add_request(rid, p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    tokens: dict[int, list[int]] = {rid: [] for rid in range(len(prompts))}
    t_first, steps = None, 0
    while engine.num_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        if t_first is None and any(tokens.values()):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t_first = time.perf_counter()
        elif t_first is not None:
            steps += 1
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - (t_first or time.perf_counter()), steps


def release(*engines: Engine) -> None:
    for e in engines:  # drop every reference to the KV pool and the graphs' memory
        e.runner.kv_cache = e.runner.graphs = None
        if e.spec is not None:
            e.spec.kv_cache = e.spec.graphs = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def identity(model, device, prompts, new_tokens, label: str, perfect: bool, with_graphs: bool = True) -> None:
    runs = {}
    for name, k, graphs in (("k=0 eager", 0, False), ("k=3 eager", 3, False), ("k=3 graphs", 3, True)):
        if graphs and (device.type != "cuda" or not with_graphs):
            continue
        engine = make_engine(model, device, k, graphs)
        toks, _, _ = generate(engine, prompts, new_tokens)
        runs[name] = (toks, engine.spec.stats.mean_acceptance_length if engine.spec else 0.0)
        release(engine)
    base = runs["k=0 eager"][0]
    for name, (toks, acc) in runs.items():
        if name == "k=0 eager":
            continue
        same = sum(toks[r] == base[r] for r in base)
        first = min(
            (
                next(i for i, (a, b) in enumerate(zip(toks[r], base[r], strict=True)) if a != b)
                for r in base
                if toks[r] != base[r]
            ),
            default=None,
        )
        where = "" if first is None else f", first difference at token {first}"
        ok = (same == len(base) and acc == 4.0) if perfect else None
        row(f"{label}: greedy {name} == k=0", f"{same}/{len(base)} requests identical{where}; accept len {acc:.2f}", ok)


def speed(model, device, prompt: list[int], new_tokens: int) -> None:
    for name, k, graphs, overlap in (
        ("k=0 eager", 0, False, False),
        ("k=0 graphs+overlap", 0, True, True),
        ("k=3 eager", 3, False, False),
        ("k=3 graphs", 3, True, False),
    ):
        if graphs and device.type != "cuda":
            continue
        engine = make_engine(model, device, k, graphs, overlap, max_bs=1)
        generate(engine, [prompt], 16)  # warm-up (Triton compilation, allocator)
        toks, secs, steps = generate(engine, [prompt], new_tokens)
        n = len(toks[0]) - 1
        per_step = n / max(steps, 1)
        row(
            f"batch 1 tokens/s per user, {name}",
            f"{n / secs:8.1f} tok/s ({n} tokens, {steps} steps, "
            f"{per_step:.2f} tok/step, {1e3 * secs / max(steps, 1):.1f} ms/step)",
            None,
        )
        release(engine)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a small model (dry run of the code paths)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-random", action="store_true", help="skip the identity run on the non-perfect model")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, torch {torch.__version__}")
    config = small_config() if args.small else moonlight_16b_a3b_config()
    t0 = time.perf_counter()
    model = build_random_mtp_model(config, dtype=dtype, device=device, seed=0, std=0.02)
    print(
        f"model: {config.num_hidden_layers} layers + 1 MTP, hidden {config.hidden_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, built in {time.perf_counter() - t0:.1f} s"
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(2, config.vocab_size) for _ in range(n)] for n in (37, 5, 120, 64)]
    if not args.skip_random:
        identity(model, device, prompts, 32, "random MTP", perfect=False, with_graphs=False)
    subset = rng.sample(range(2, config.vocab_size), min(1024, config.hidden_size // 2))
    f = make_perfect_draft_(model, subset, seed=1)
    prompts = [[rng.choice(subset) for _ in range(len(p))] for p in prompts]
    chain = [f[prompts[0][-1]]]
    for _ in range(47):
        chain.append(f[chain[-1]])
    engine = make_engine(model, device, 0, False)
    got, _, _ = generate(engine, prompts[:1], 48)
    release(engine)
    row(
        "perfect draft: target follows f (k=0)",
        f"{sum(a == b for a, b in zip(got[0], chain, strict=False))}/48 tokens",
        got[0] == chain,
    )
    identity(model, device, prompts, 64, "perfect draft", perfect=True)
    speed(model, device, prompts[3], args.new_tokens)
    print("\nSUMMARY")
    for check, result, ok in ROWS:
        print(f"{check:44} {result:58} {'info' if ok is None else ('ok' if ok else 'FAIL')}")
    failed = any(ok is False for _, _, ok in ROWS)
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
