"""The agentic benchmark's command line: sweep, HF baseline, trace writing, re-plotting. See agentic.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serving import roofline as rl
from benchmarks.serving.metrics import pareto_envelope, summarize_run, value_at_floor
from benchmarks.serving.report import print_report
from benchmarks.serving.trace import (
    Conversation,
    TokenSynth,
    TraceConfig,
    generate_conversation,
    read_trace_file,
    trace_stats,
    workload_shape,
    write_trace_file,
)


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{name} must list integers >= 1, got {text!r}")
    return values


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agentic", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backend",
        choices=["openai", "hf"],
        default="openai",
        help="openai: replay against --base-url; hf: transformers generate() of --model, one user",
    )
    g = ap.add_argument_group("endpoint")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (…/v1/completions is appended)")
    g.add_argument("--model-name", default=None, help="model field of requests (default: the first of /v1/models)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--prompt-format", choices=["ids", "text"], default="ids", help="token-id prompts or text prompts")
    g.add_argument("--tokenizer", default=None, help="HF tokenizer dir: text prompts, and re-tokenising outputs")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument(
        "--no-request-token-ids",
        action="store_true",
        help="do not send return_token_ids (for servers that reject unknown fields)",
    )
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    t = ap.add_argument_group("trace (generator, unless --trace-file)")
    t.add_argument("--trace-file", default=None, help="JSONL: tokenspeed-trie lengths and/or OpenAI messages")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--first-turn-tokens", type=int, default=50_000)
    t.add_argument("--later-turn-tokens", type=int, default=800)
    t.add_argument("--min-turns", type=int, default=10)
    t.add_argument("--max-turns", type=int, default=15)
    t.add_argument("--output-tokens", type=int, default=500, help="per turn, generated with ignore_eos")
    t.add_argument("--shared-prefix-tokens", type=int, default=0, help="a system prompt shared by all conversations")
    t.add_argument("--length-scale", type=float, default=1.0, help="multiply every trace length (CPU runs: 0.01)")
    t.add_argument("--max-context", type=int, default=None, help="drop turns that would not fit this context")
    t.add_argument("--vocab-size", type=int, default=None, help="ids are drawn from [--min-token-id, this)")
    t.add_argument("--min-token-id", type=int, default=1)
    t.add_argument("--write-trace", default=None, help="write --num-trace conversations in the lengths format and exit")
    t.add_argument("--num-trace", type=int, default=64)
    s = ap.add_argument_group("sweep")
    s.add_argument("--concurrency", type=lambda v: _int_list(v, "--concurrency"), default=[1, 2, 4, 8, 16, 32])
    s.add_argument("--conversations-per-slot", type=int, default=2, help="conversations per simulated user and run")
    s.add_argument("--no-stagger", action="store_true", help="start every user at turn 0")
    s.add_argument("--max-run-seconds", type=float, default=None, help="stop starting requests after this long per run")
    s.add_argument("--num-gpus", type=int, default=1, help="GPUs behind the endpoint (TPM is divided by it)")
    s.add_argument("--floors", type=lambda v: _int_list(v, "--floors"), default=[70, 200], help="tokens/s per user")
    o = ap.add_argument_group("output")
    o.add_argument("--out", default="agentic_results.json")
    o.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    o.add_argument("--requests-out", default=None, help="JSONL of every request's timestamps")
    o.add_argument("--label", default=None, help="legend name of the measured series")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--replot", default=None, help="re-plot and re-print an existing results JSON, then exit")
    o.add_argument("--baseline-json", default=None, help="an --backend hf result to show beside the sweep")
    r = ap.add_argument_group("roofline")
    r.add_argument("--roofline-model", default=None, help="model dir or config.json (DeepSeek-V3 shaped)")
    r.add_argument("--copy-gbps", type=float, default=None)
    r.add_argument("--matmul-tflops", type=float, default=None)
    r.add_argument("--measure-roofline", action="store_true", help="probe this machine's GPU (copy + matmul)")
    r.add_argument("--gpu-memory-gib", type=float, default=None, help="for the KV cap on the roofline batch")
    h = ap.add_argument_group("hf backend")
    h.add_argument("--model", default=None, help="model directory (--backend hf)")
    h.add_argument("--device", default="cuda")
    h.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    h.add_argument("--hf-turns", type=int, default=1, help="turns of conversation 0 to run")
    return ap


def trace_config(args: argparse.Namespace) -> TraceConfig:
    cfg = TraceConfig(
        first_turn_tokens=args.first_turn_tokens,
        later_turn_tokens=args.later_turn_tokens,
        min_turns=args.min_turns,
        max_turns=args.max_turns,
        output_tokens=args.output_tokens,
        shared_prefix_tokens=args.shared_prefix_tokens,
        length_scale=args.length_scale,
        max_context=args.max_context,
        seed=args.seed,
    )
    cfg.validate()
    return cfg


class HFTokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def __len__(self) -> int:
        return len(self.hf)


def _vocab_size(args: argparse.Namespace, tokenizer: HFTokenizer | None) -> int:
    if args.vocab_size:
        return args.vocab_size
    if tokenizer is not None:
        return len(tokenizer)
    for path in (args.model, args.roofline_model):
        if path:
            cfg = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
            if cfg.is_file():
                return int(json.loads(cfg.read_text())["vocab_size"])
    return 32000


def _conversations(args: argparse.Namespace, cfg: TraceConfig):
    """(conversation_at(i), a sample for statistics)."""
    if args.trace_file:
        convs = read_trace_file(args.trace_file, cfg.scaled(args.output_tokens))
        return (lambda i: convs[i % len(convs)]), convs
    return (lambda i: generate_conversation(cfg, i)), [generate_conversation(cfg, i) for i in range(64)]


def _hardware(args: argparse.Namespace) -> rl.Hardware | None:
    if args.measure_roofline:
        hw = rl.measure_hardware()
    elif args.copy_gbps and args.matmul_tflops:
        hw = rl.Hardware(args.copy_gbps, args.matmul_tflops)
    else:
        return None
    if args.gpu_memory_gib:
        hw.memory_bytes = args.gpu_memory_gib * 2**30
    return hw


def _decode_context(records: list) -> float | None:
    """Mean KV length while decoding, over a run's successful requests."""
    ctx = [r.prompt_tokens + r.completion_tokens / 2 for r in records if r.ok and r.prompt_tokens]
    return float(np.mean(ctx)) if ctx else None


def finish_results(results: dict[str, Any], floors: list[int]) -> None:
    """Envelope, floors, roofline comparisons (from the runs and the roofline already in ``results``)."""
    pts = [
        (r["tokens_per_s_per_user"], r["tpm_per_gpu"])
        for r in results["runs"]
        if r.get("tokens_per_s_per_user") and r.get("tpm_per_gpu")
    ]
    results["envelope"] = pareto_envelope(pts)
    on_env = {tuple(p) for p in results["envelope"]}
    shaky = [
        r["concurrency"]
        for r in results["runs"]
        if not r["steady_state"] and (r.get("tokens_per_s_per_user"), r.get("tpm_per_gpu")) in on_env
    ]
    results["envelope_non_steady_runs"] = shaky  # concurrencies whose TPM includes ramp-up/down (too short a run)
    roof = results.get("roofline")
    roof_env = pareto_envelope([(p["tokens_per_s_per_user"], p["tpm_per_gpu"]) for p in roof["frontier"]]) if roof else []
    results["floors"] = []
    for f in floors:
        entry = value_at_floor(results["envelope"], f)
        if roof:
            rv = value_at_floor(roof_env, f)
            entry["roofline_tpm_per_gpu"] = rv["tpm_per_gpu"]
            if entry["tpm_per_gpu"] and rv["tpm_per_gpu"]:
                entry["fraction_of_roofline"] = entry["tpm_per_gpu"] / rv["tpm_per_gpu"]
        results["floors"].append(entry)


def run_sweep(args: argparse.Namespace) -> int:
    from benchmarks.serving.client import Endpoint, fetch_model_name, run_concurrency

    cfg = trace_config(args)
    conversation_at, sample = _conversations(args, cfg)
    tokenizer = HFTokenizer(args.tokenizer) if args.tokenizer else None
    synth = TokenSynth(args.seed, args.min_token_id, _vocab_size(args, tokenizer))
    model = args.model_name or fetch_model_name(args.base_url, args.api_key)
    ep = Endpoint(
        args.base_url,
        model,
        args.api_key,
        args.prompt_format,
        args.temperature,
        not args.no_request_token_ids,
        True,
        args.request_timeout,
    )
    ep.validate()
    hw = _hardware(args)  # before the sweep: the GPU is idle
    results: dict[str, Any] = {
        "benchmark": "agentic",
        "version": 1,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "label": args.label or model,
        "endpoint": {"base_url": args.base_url, "model": model, "prompt_format": args.prompt_format},
        "args": {k: v for k, v in vars(args).items() if k != "api_key"},
        "trace": trace_stats(sample),
        "runs": [],
    }
    lengths = [c for c in sample if c.messages is None]
    if args.roofline_model and hw is not None and lengths:
        m = rl.ModelShape.from_path(args.roofline_model)
        results["roofline"] = rl.summary(m, hw, workload_shape(lengths), args.num_gpus)
    elif args.roofline_model:
        print(
            "roofline skipped: needs --measure-roofline or --copy-gbps and --matmul-tflops, and a lengths trace", file=sys.stderr
        )
    if args.baseline_json:
        results["hf_baseline"] = json.loads(Path(args.baseline_json).read_text()).get("hf_baseline")
    out = Path(args.out)
    for path in (args.out, args.requests_out, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    req_file = open(args.requests_out, "w") if args.requests_out else None  # noqa: SIM115 (closed below)
    any_errors = False
    try:
        for i, c in enumerate(args.concurrency):
            res = asyncio.run(
                run_concurrency(
                    conversation_at,
                    c * args.conversations_per_slot,
                    c,
                    ep,
                    synth,
                    tokenizer,
                    run_tag=f"s{args.seed}r{i}c{c}t{int(time.time())}",
                    stagger=not args.no_stagger,
                    max_seconds=args.max_run_seconds,
                    progress=not args.no_progress,
                )
            )
            summary = summarize_run(res.records, c, args.num_gpus, res.duration_s)
            summary["output_feedback"] = res.feedback
            summary["mean_decode_context"] = _decode_context(res.records)
            any_errors |= summary["errors"] > 0
            results["runs"].append(summary)
            if req_file:
                for r in res.records:
                    req_file.write(json.dumps({"concurrency": c, **r.to_json()}) + "\n")
            finish_results(results, args.floors)
            _add_batch1(results)
            out.write_text(json.dumps(results, indent=1))  # after every run: a timeout keeps what finished
            tps, tpm = summary["tokens_per_s_per_user"], summary["tpm_per_gpu"]
            print(
                f"run c={c}: {tps or 0:.1f} tokens/s/user, {tpm or 0:.0f} TPM/GPU, "
                f"{summary['errors']} errors of {summary['requests']}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if req_file:
            req_file.close()
    _plot(results, args)
    out.write_text(json.dumps(results, indent=1))
    print_report(results)
    return 1 if any_errors or not results["runs"] else 0


def _add_batch1(results: dict[str, Any]) -> None:
    """Issue 10's first check: the concurrency-1 run against the bandwidth roofline at its own context."""
    roof = results.get("roofline")
    one = next((r for r in results["runs"] if r["concurrency"] == 1), None)
    if not roof or not one or not one.get("tokens_per_s_per_user") or not one.get("mean_decode_context"):
        return
    m = rl.ModelShape(**roof["model"])
    hw = rl.Hardware(**roof["hardware"])
    b1 = rl.batch1_decode(m, hw, one["mean_decode_context"])
    results["batch1"] = {
        **b1,
        "measured_tokens_per_s": one["tokens_per_s_per_user"],
        "fraction_of_roofline": one["tokens_per_s_per_user"] / b1["tokens_per_s"],
        "mtp": False,
    }


def _plot(results: dict[str, Any], args: argparse.Namespace) -> None:
    from benchmarks.serving.plot import plot_pareto

    path = args.plot or str(Path(args.out).with_suffix(".png"))
    try:
        results["plot"] = str(plot_pareto(results, path))
    except RuntimeError as exc:  # matplotlib missing: say so, keep the JSON
        print(f"plot skipped: {exc}", file=sys.stderr)


def run_hf(args: argparse.Namespace) -> int:
    from benchmarks.serving.hf_baseline import run_hf_baseline

    if not args.model:
        raise SystemExit("--backend hf needs --model (a model directory)")
    cfg = trace_config(args)
    conversation_at, _ = _conversations(args, cfg)
    synth = TokenSynth(args.seed, args.min_token_id, _vocab_size(args, None))
    conv: Conversation = conversation_at(0)
    res = run_hf_baseline(args.model, conv, synth, args.hf_turns, args.device, args.dtype)
    results = {
        "benchmark": "agentic",
        "version": 1,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hf_baseline": res,
        "runs": [],
        "args": vars(args),
    }
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_report(results)
    return 0 if res["tokens_per_s_per_user"] else 1


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    args = build_parser(description).parse_args(argv)
    for name in ("conversations_per_slot", "num_gpus", "num_trace"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        if args.baseline_json:
            results["hf_baseline"] = json.loads(Path(args.baseline_json).read_text()).get("hf_baseline")
        finish_results(results, args.floors)
        _plot(results, argparse.Namespace(plot=args.plot, out=args.replot))
        Path(args.replot).write_text(json.dumps(results, indent=1))  # with the baseline and the recomputed floors
        print_report(results)
        return 0
    try:
        if args.write_trace:
            cfg = trace_config(args)
            write_trace_file(args.write_trace, [generate_conversation(cfg, i) for i in range(args.num_trace)])
            print(json.dumps(trace_stats(read_trace_file(args.write_trace)), indent=1))
            return 0
        return run_hf(args) if args.backend == "hf" else run_sweep(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"agentic: {exc}", file=sys.stderr)
        return 2
