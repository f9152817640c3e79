"""Device check: a Moonlight-16B-A3B-shaped DeepSeek-V3 with random weights on a GPU.

For each dtype (default fp32, then bf16) it builds the model with random weights, runs a
short prompt through prefill and 5 greedy decode steps with tokenspeed's model code and the
kernels the registry selects (paged latent cache, absorbed MLA decode, fused MoE), then
recomputes the same positions with an fp32 full causal forward through Hugging Face
transformers' DeepSeek-V3 modules, built layer by layer from the same weights (no tokenspeed
op runs there), and prints a table.

fp32 must match tightly. bf16: a random MoE model routes tokens on near-equal scores, so
bf16 rounding flips some expert choices and a free-running fp32 reference diverges over 27
layers (the table counts those flips in the prefill). So for bf16 the reference is, by
default, teacher-forced onto our routing: its router keeps its own fp32 scores but takes the
expert ids our model chose for each token and layer (weights = its sigmoid scores at those
ids, normalised and scaled as usual). What remains is bf16 rounding, which must be small:
rel err < 5e-2, cosine > 0.995, same top-1 unless the reference's top-2 margin is within our
error. `--free-routing` gives the old free-running report. Exit status 1 on failure.

    python scripts/check_model_device.py                      # cuda, fp32 then bf16, 27 layers
    python scripts/check_model_device.py --device cpu --layers 2 --dtypes float32   # a quick dry run

Needs transformers (the reference). About a minute on an H100 (fp32 needs ~62 GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time

import torch

from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch
from tokenspeed_engine.models.configs import build_random_model, moonlight_16b_a3b_config
from tokenspeed_engine.models.hf_export import hf_reference_logits
from tokenspeed_kernels import registry
from tokenspeed_kernels.reference.moe import moe_route_ref


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model, prompt: list[int], steps: int, page_size: int, device: torch.device, gen: torch.Generator):
    """Prefill + greedy decode through the paged cache: (tokens, logits per step, seconds per step)."""
    total = len(prompt) + steps + 1
    num_pages = -(-total // page_size) + 8
    kv = model.make_kv_cache(num_pages, page_size)
    pages = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # random order, never the null page 0
    tokens, logits, times = list(prompt), [], []
    for step in range(steps + 1):
        mode = ForwardMode.EXTEND if step == 0 else ForwardMode.DECODE
        new = prompt if step == 0 else [tokens[-1]]
        batch = build_forward_batch([SequenceInput(len(tokens) - len(new), new, pages)], page_size, mode, device)
        sync(device)
        t = time.perf_counter()
        out = model(batch, kv)[0].float()
        sync(device)
        times.append(time.perf_counter() - t)
        logits.append(out)
        if step < steps:
            tokens.append(int(out.argmax()))
    return tokens, logits, times


def check(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> bool:
    config = moonlight_16b_a3b_config()
    if args.layers:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    t0 = time.perf_counter()
    model = build_random_model(config, dtype=dtype, device=device, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n=== {dtype}: Moonlight-16B-A3B shape, {config.num_hidden_layers} layers, {params / 1e9:.2f} B parameters "
        f"(random weights, {time.perf_counter() - t0:.1f} s)"
    )
    print(
        "kernels: "
        + ", ".join(
            f"{op} -> {registry.select(op, device=device, dtype=dtype).backend}"
            for op in ("mla_prefill", "mla_decode", "moe_route", "fused_moe")
        )
    )
    c, n = config, args.prompt_len
    ours_calls: dict[int, list[torch.Tensor]] = {}  # layer -> expert ids of each forward, in order
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):

            def record(mod, _args, logits, i=i):
                ids = moe_route_ref(
                    logits.float(), c.num_experts_per_tok, c.scoring_func, mod.e_score_correction_bias, c.n_group, c.topk_group
                )[1]
                ours_calls.setdefault(i, []).append(ids)

            hooks.append(layer.mlp.gate.register_forward_hook(record))
    ref_ids: dict[int, torch.Tensor] = {}
    force = dtype != torch.float32 and not args.free_routing

    def hook_reference(i: int, layer: torch.nn.Module) -> None:
        if not hasattr(layer.mlp, "gate"):
            return

        def on_gate(mod, _args, out, i=i):
            ref_ids[i] = out[2][:n].sort(-1).values
            if not force:
                return None
            router_logits = out[0]
            ids = torch.cat(ours_calls[i]).to(router_logits.device, torch.long)  # a row per token position
            w = router_logits.sigmoid().gather(1, ids)
            if mod.norm_topk_prob:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return router_logits, w * mod.routed_scaling_factor, ids

        layer.mlp.gate.register_forward_hook(on_gate)

    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
    with torch.no_grad():
        tokens, ours, times = run_ours(model, prompt, args.steps, args.page_size, device, gen)
        for h in hooks:
            h.remove()
        t = time.perf_counter()
        ref = hf_reference_logits(model, tokens, torch.float32, on_layer=hook_reference)[n - 1 :]
        took = time.perf_counter() - t
    ours_ids = {i: calls[0].sort(-1).values for i, calls in ours_calls.items()}  # the prefill
    by_layer = [int((ours_ids[i].to(ref_ids[i].device) != ref_ids[i]).any(-1).sum()) for i in sorted(ref_ids)]
    flips, choices = sum(by_layer), sum(v.shape[0] for v in ref_ids.values())
    print(f"fp32 reference (transformers, layer by layer) over {len(tokens)} tokens: {took:.1f} s")
    print(
        f"prefill routing: {flips} of {choices} token-layer expert sets differ from the reference's; "
        f"by MoE layer (of {n} tokens each): {by_layer}"
    )
    if force:
        print("bf16 check: the reference is teacher-forced onto our expert ids (see the docstring)")

    strict = dtype == torch.float32
    tol = args.tol or (1e-3 if strict else 5e-2)
    print(f"{'step':>4} {'mode':7} {'ms':>8} {'ours top1':>10} {'ref top1':>9} {'rel err':>9} {'cosine':>9}  ok")
    passed = True
    for i, (a, r) in enumerate(zip(ours, ref, strict=True)):
        rel = float((a - r).abs().max() / r.abs().max())
        cos = float(torch.nn.functional.cosine_similarity(a, r, dim=0))
        top_a, top_r = int(a.argmax()), int(r.argmax())
        margin = float(r.topk(2).values.diff().abs())  # a top-1 swap within our error is no error
        min_cos = 0.999 if strict else 0.995
        close = rel < tol and cos > min_cos and (top_a == top_r or margin < 2 * float((a - r).abs().max()))
        ok = close if (strict or force) else (cos > 0.5 and (close or flips > 0))
        passed &= ok
        mode = "prefill" if i == 0 else "decode"
        verdict = "yes" if ok else "NO"
        print(f"{i:>4} {mode:7} {times[i] * 1e3:8.1f} {top_a:>10} {top_r:>9} {rel:9.2e} {cos:9.6f}  {verdict}")
    if strict or force:
        rule = f"rel err < {tol:g}, cosine > {min_cos}" + ("" if strict else ", routing teacher-forced")
    else:
        rule = "free routing: cosine > 0.5; close unless routing flipped"
    print(f"{dtype}: {'PASSED' if passed else 'FAILED'} ({rule})")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return passed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, run in order")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: Moonlight's 27)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--free-routing", action="store_true", help="bf16: do not teacher-force the reference's routing")
    ap.add_argument("--tol", type=float, default=None, help="max |ours - ref| / max |ref| (default by dtype)")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device: {name}, torch {torch.__version__}")
    results = [check(args, getattr(torch, d), device) for d in args.dtypes.split(",")]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
