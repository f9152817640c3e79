"""Issue 8, end to end: greedy generations with an fp8 latent KV cache vs the bf16 cache.

The Moonlight-16B-A3B-shaped DeepseekV3 with random bf16 weights runs the same prompts twice
through the engine (CUDA graphs off, so both runs take the same op-by-op path), once with a
bf16 latent cache and once with an e4m3 cache (per-tensor scale), and reports per prompt how
many of the first ``--tokens`` greedy tokens agree, the rate of prompts that agree on all of
them, and the KV pool capacity (tokens) each cache dtype gets from the same memory budget.

    python scripts/check_fp8_kv_agreement.py [--prompts 16] [--tokens 32] [--layers N]
    python scripts/check_fp8_kv_agreement.py --tiny --device cpu   # checks the script without a GPU

A random-weight MoE model routes on near-equal scores, so it is a harsher test than a trained
model: one flipped expert choice changes the hidden state. Exit status 0 (this reports a rate;
the issue's bar is "most prompts").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.random_moonlight import IdTokenizer, moonlight_config  # noqa: E402
from tokenspeed_engine.engine import Engine, EngineConfig  # noqa: E402
from tokenspeed_engine.kv_cache import set_kv_cache_dtype  # noqa: E402
from tokenspeed_engine.launch import _num_pages  # noqa: E402
from tokenspeed_engine.model_runner import TorchModelRunner  # noqa: E402
from tokenspeed_engine.models.configs import build_random_model  # noqa: E402
from tokenspeed_engine.sampling import SamplingParams  # noqa: E402

PAGE = 64


def generate(
    model: torch.nn.Module, kv_dtype: str, prompt: list[int], tokens: int, device: str
) -> tuple[list[int], torch.Tensor]:
    """Greedy ``tokens`` tokens for one prompt (its own engine and cache) and the fp32 logits
    that chose the first of them (the prefill's last row)."""
    set_kv_cache_dtype(model, kv_dtype)
    max_len = len(prompt) + tokens + 1
    pages = -(-max_len // PAGE) + 1
    kv = model.make_kv_cache(pages, PAGE, device=device)
    runner = TorchModelRunner(model, kv, num_pages=pages, page_size=PAGE, max_model_len=max_len,
                              vocab_size=model.config.vocab_size, device=device, cuda_graph_max_bs=0)  # fmt: skip
    first: list[torch.Tensor] = []
    execute = runner.execute

    def recording(*a: object, **k: object) -> torch.Tensor:
        logits = execute(*a, **k)
        if not first and logits.shape[0]:
            first.append(logits[0].float().cpu())
        return logits

    runner.execute = recording  # type: ignore[method-assign]
    engine = Engine(runner, IdTokenizer(), set(), EngineConfig(8192, 1))
    engine.add_request(0, prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    out: list[int] = []
    while engine.num_unfinished():
        for o in engine.step():
            out += o.token_ids
    return out, first[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=None, help="Moonlight layers (default: all 27)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, narrow model (checks the script on CPU)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    cfg = moonlight_config(args.tiny, args.layers)
    model = build_random_model(cfg, dtype=torch.bfloat16, device=args.device, seed=7)
    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(16, 2048, (args.prompts,), generator=gen).tolist()
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    agree, margins, deltas, rel = [], [], [], []
    with torch.inference_mode():
        for p in prompts:
            (a, la), (b, lb) = (generate(model, d, p, args.tokens, args.device) for d in ("bf16", "fp8"))
            agree.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
            top2 = la.topk(2).values
            margins.append(float(top2[0] - top2[1]))  # how far the bf16 run's choice was from a tie
            deltas.append(float((lb - la).abs().max()))  # how far the fp8 cache moved the logits
            rel.append(float((lb - la).norm() / la.norm()))
    full = sum(n == args.tokens for n in agree)
    # the pool the server would allocate now (launch's own sizing: free GPU memory at 0.9
    # utilisation, logged as at startup), once per cache dtype
    cap = {}
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    for name in ("bf16", "fp8"):
        set_kv_cache_dtype(model, name)
        if args.device == "cuda":
            torch.cuda.empty_cache()
            cap[name] = (_num_pages(model, torch.device(args.device), PAGE, None, 0.9) - 1) * PAGE
        else:
            cap[name] = (64 << 30) // model.kv_bytes_per_token()  # a 64 GiB budget
    print(f"Moonlight-shaped, {cfg.num_hidden_layers} layers, random bf16 weights, {args.prompts} prompts of "
          f"{min(lengths)}..{max(lengths)} tokens, greedy, {args.device}")  # fmt: skip
    print(f"prompt | prompt tokens | first tokens equal (of {args.tokens}) | bf16 top-1 margin | max |logit change| | rel change")
    for i, (n, ln) in enumerate(zip(agree, lengths, strict=True)):
        print(f"{i} | {ln} | {n} | {margins[i]:.4f} | {deltas[i]:.4f} | {rel[i]:.2e}")
    print(f"all {args.tokens} tokens equal on {full}/{args.prompts} prompts ({100 * full / args.prompts:.0f}%); "
          f"mean agreeing prefix {sum(agree) / len(agree):.1f} tokens")  # fmt: skip
    print(f"KV pool at the same memory: bf16 {cap['bf16']} tokens, fp8 {cap['fp8']} tokens ({cap['fp8'] / cap['bf16']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"lengths": lengths, "agree": agree, "full": full, "capacity": cap, "margins": margins,
                                              "max_logit_change": deltas, "rel_logit_change": rel}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
