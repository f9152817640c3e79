"""Device check of the engine: CUDA-graph decode against eager, overlap, and a served model's decode speed.

    python scripts/check_engine_device.py graphs [--moonlight-layers N]  # part (a), exit 1 on a mismatch
    python scripts/check_engine_device.py client --url URL --label L    # part (b): talk to a running server

Part (a), for a small random DeepSeek-V3 and a Moonlight-16B-A3B-shaped one (27 layers, bf16,
random weights): two runners share the model, one with decode graphs (batch buckets 1, 2,
4, 8), one eager; each has its own KV pool.
  * bitwise: ``DecodeGraphs.run`` (replay) vs ``run_eager`` (the same forward over the same
    static buffers, launched op by op) at every bucket with padding rows;
  * engine: 4 greedy requests (a bucket size, so both runners launch the same kernels) through
    an overlap engine on the graph runner and a serial engine on the eager runner: every
    step's logits must be bit-identical and so the tokens; 3 requests (padded to 4 in the
    graph): tokens compared, the logits' max difference reported;
  * host syncs: decode steps of the overlap engine under ``torch.cuda.set_sync_debug_mode``
    (a sync inside a step would serialise the overlap);
  * in-process decode step time at batch 1: graph / eager x overlap on / off.
Part (b) (``client``) sends a completion and a chat completion, then streams one request
(batch 1, 128 tokens, ignore_eos) and prints its decode tokens/s as ``DECODE_TPS label value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import sys
import time
import urllib.parse
import urllib.request
import warnings

import numpy as np
import torch

from tokenspeed_engine.cuda_graph import decode_inputs
from tokenspeed_engine.engine import Engine, EngineConfig
from tokenspeed_engine.model_runner import TorchModelRunner
from tokenspeed_engine.models.configs import DeepseekV3Config, build_random_model, moonlight_16b_a3b_config
from tokenspeed_engine.sampling import SamplingParams
from tokenspeed_kernels import registry

PAGE = 64
MAX_LEN = 4096
ROWS: list[tuple[str, str, str, bool]] = []  # (model, check, result, ok)


def row(model: str, check: str, result: str, ok: bool) -> None:
    ROWS.append((model, check, result, ok))
    print(f"{model:10} {check:52} {result:50} {'ok' if ok else 'FAIL'}", flush=True)


class IdTokenizer:
    def encode(self, text: str) -> list[int]:
        return [int(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{i} " for i in ids)


class Recording:
    """Wraps a runner; keeps a copy of every step's logits."""

    def __init__(self, runner: TorchModelRunner):
        self.runner, self.logits = runner, []
        for name in ("vocab_size", "num_pages", "page_size", "max_model_len", "device", "supports_overlap"):
            setattr(self, name, getattr(runner, name))

    def forward(self, plan, block_table, input_ids=None):
        out = self.runner.forward(plan, block_table, input_ids)
        self.logits.append(out.clone())
        return out


def small_config() -> DeepseekV3Config:
    """Moonlight's attention shape (16 heads, 512 + 64 latent, 128 nope, 128 v) in 4 small layers."""
    return dataclasses.replace(
        moonlight_16b_a3b_config(),
        vocab_size=4099,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        n_routed_experts=16,
        num_experts_per_tok=4,
    )


def runner(model, graphs: int, kv_tokens: int = 8192) -> TorchModelRunner:
    pages = kv_tokens // PAGE + 1
    kv = model.make_kv_cache(pages, PAGE)
    return TorchModelRunner(model, kv, num_pages=pages, page_size=PAGE, max_model_len=MAX_LEN,
                            vocab_size=model.config.vocab_size, device="cuda", cuda_graph_max_bs=graphs)  # fmt: skip


def generate(run, prompts, overlap: bool, max_tokens: int = 12):
    e = Engine(run, IdTokenizer(), set(), EngineConfig(4096, 16, enable_overlap=overlap))
    for rid, p in enumerate(prompts):
        e.add_request(rid, p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    toks: dict[int, list[int]] = {}
    while e.num_unfinished():
        for o in e.step():
            toks.setdefault(o.request_id, []).extend(o.token_ids)
    return toks


def backend(op: str, model) -> str:
    c = model.config
    traits = {"mla_decode": dict(page_size=PAGE, heads=c.num_attention_heads, q_len=1, head_dim=576),
              "mla_prefill": dict(head_dim_qk=c.qk_head_dim, head_dim_v=c.v_head_dim)}.get(op, {})  # fmt: skip
    try:
        return registry.select(op, "cuda", torch.bfloat16, **traits).backend
    except Exception as exc:  # a report line, not a failure: the forward itself will say more
        return f"? ({exc})"


def check_model(name: str, model, seed: int) -> None:
    vocab = model.config.vocab_size
    kernels = ", ".join(f"{op}={backend(op, model)}" for op in ("mla_decode", "mla_prefill", "moe_route", "fused_moe"))
    print(f"--- {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters; {kernels}", flush=True)
    t = time.perf_counter()
    graph_runner = runner(model, graphs=8)
    row(name, "capture buckets", f"{graph_runner.graphs.buckets} in {time.perf_counter() - t:.1f} s", True)
    eager_runner = runner(model, graphs=0)
    g = torch.Generator().manual_seed(seed)
    # bitwise replay vs op-by-op over the same static buffers, padding rows included
    worst = 0.0
    graphs = graph_runner.graphs
    for n in (1, 2, 3, 5, 8):
        bucket = graphs.bucket(n)
        prefix = torch.randint(1, 2000, (n,), generator=g).numpy()
        pages = np.zeros((n, graph_runner.max_pages), dtype=np.int32)
        for b in range(n):
            used = int(prefix[b]) // PAGE + 1
            pages[b, :used] = (torch.randperm(graph_runner.num_pages - 1, generator=g)[:used] + 1).numpy()
        inputs = decode_inputs(prefix, pages, PAGE, graph_runner.max_pages, bucket)
        ids = torch.randint(0, vocab, (n,), generator=g).cuda()
        with torch.inference_mode():
            a, b = graphs.run(inputs, ids), graphs.run_eager(inputs, ids)
        worst = max(worst, float((a - b).abs().max()))
    row(name, "replay == op-by-op, batches 1,2,3,5,8", f"max |diff| {worst:.3g}", worst == 0.0)

    for n, bitwise in ((4, True), (3, False)):
        prompts = [torch.randint(0, vocab, (37 + 11 * i,), generator=g).tolist() for i in range(n)]
        rg, re = Recording(graph_runner), Recording(eager_runner)
        tg, te = generate(rg, prompts, overlap=True), generate(re, prompts, overlap=False)
        same_shapes = [a.shape for a in rg.logits] == [b.shape for b in re.logits]
        diff = max(float((a - b).abs().max()) for a, b in zip(rg.logits, re.logits, strict=True)) if same_shapes else -1
        label = f"engine batch {n}: graph+overlap vs eager+serial"
        if bitwise:
            row(name, label + " logits", f"{len(rg.logits)} steps, max |diff| {diff:.3g}", same_shapes and diff == 0.0)
        else:
            row(name, label + " logits", f"{len(rg.logits)} steps, max |diff| {diff:.3g} (padded: not bitwise)", True)
        row(name, label + " tokens", "identical" if tg == te else f"differ: {tg} vs {te}", tg == te)

    # host syncs inside decode steps of the overlap engine
    e = Engine(graph_runner, IdTokenizer(), set(), EngineConfig(4096, 16, enable_overlap=True))
    for rid in range(4):
        e.add_request(rid, torch.randint(0, vocab, (50,), generator=g).tolist(),
                      SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))  # fmt: skip
    for _ in range(4):  # prefill and the first decodes outside the check
        e.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(20):
                e.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    row(name, "host syncs in 20 overlapped decode steps", f"{len(syncs)} {syncs[0][:40] if syncs else ''}", True)
    while e.num_unfinished():
        e.step()

    # decode step time at batch 1
    prompt = torch.randint(0, vocab, (100,), generator=g).tolist()
    for label, run in (("graph", graph_runner), ("eager", eager_runner)):
        for overlap in (True, False):
            generate(run, [prompt], overlap, max_tokens=4)  # warm
            torch.cuda.synchronize()
            t = time.perf_counter()
            generate(run, [prompt], overlap, max_tokens=65)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / 65 * 1e3
            row(name, f"batch-1 step, {label}, overlap {'on' if overlap else 'off'}", f"{ms:.2f} ms/token", True)
    del graph_runner, eager_runner
    torch.cuda.empty_cache()


def graphs_main(args: argparse.Namespace) -> int:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    check_model("small", build_random_model(small_config(), dtype=torch.bfloat16, device="cuda", seed=1), 1)
    torch.cuda.empty_cache()
    cfg = moonlight_16b_a3b_config()
    if args.moonlight_layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.moonlight_layers)
    t = time.perf_counter()
    model = build_random_model(cfg, dtype=torch.bfloat16, device="cuda", seed=2)
    print(f"moonlight-shaped model built in {time.perf_counter() - t:.1f} s", flush=True)
    check_model("moonlight", model, 2)
    print("\nSUMMARY")
    for r in ROWS:
        print(f"{r[0]:10} | {r[1]:52} | {r[2]:50} | {'ok' if r[3] else 'FAIL'}")
    ok = all(r[3] for r in ROWS)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def client_main(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    model = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=30).read())["data"][0]["id"]
    r = post(url, "/v1/completions", {"model": model, "prompt": "w5 w17 w99 w1234", "max_tokens": 8, "temperature": 0})
    print(f"completion: {r['choices'][0]['text']!r} usage {r['usage']}")
    msgs = [{"role": "user", "content": "w7 w8 w9"}]
    r = post(url, "/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": 8, "temperature": 0})
    print(f"chat: {r['choices'][0]['message']['content']!r} finish {r['choices'][0]['finish_reason']}")
    # one stream at batch 1: decode tokens/s from the first to the last streamed token
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    body = {"model": model, "prompt": " ".join(f"w{i}" for i in range(100, 228)), "max_tokens": args.tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    stamps = []
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            if json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    conn.close()
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    print(f"streamed {len(stamps)} chunks")
    print(f"DECODE_TPS {args.label} {tps:.1f}")
    return 0 if len(stamps) >= args.tokens // 2 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("graphs")
    g.add_argument("--moonlight-layers", type=int, default=None, help="fewer layers for a quick run")
    c = sub.add_parser("client")
    c.add_argument("--url", required=True)
    c.add_argument("--label", required=True)
    c.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    return graphs_main(args) if args.cmd == "graphs" else client_main(args)


if __name__ == "__main__":
    sys.exit(main())
