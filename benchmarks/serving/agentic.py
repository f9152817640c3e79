"""Agentic serving benchmark: replay multi-turn coding-agent conversations against an OpenAI-compatible
endpoint, sweep concurrency, and report TPM per GPU against tokens/s per user.

Each simulated user sends one conversation's turns in order (streaming /v1/completions with
token-id or text prompts, or /v1/chat/completions for OpenAI-messages traces); turn t's prompt
is turn t-1's prompt + its output + new tokens, so a prefix cache can serve all but the new part.
Per concurrency it reports tokens/s per user (1000 / mean TPOT ms), TPM per GPU (steady state),
TTFT and inter-token latency p50/p99 and the prefix cache hit % (usage.prompt_tokens_details.
cached_tokens); it writes a JSON and a Pareto plot with the envelope (and the roofline of
benchmarks/serving/roofline.py given a model config), and prints TPM/GPU at the per-user floors.

    # a short CPU-sized sweep against a running server
    python benchmarks/serving/agentic.py --base-url http://127.0.0.1:8000 --concurrency 1,2,4 \\
        --length-scale 0.01 --out results.json
    # the SWE-smith shape (50K first turn, ~800 per later turn, 10-15 turns, 500 output tokens) on a GPU
    python benchmarks/serving/agentic.py --concurrency 1,4,8,16,32 --tokenizer MODEL_DIR \\
        --roofline-model MODEL_DIR --measure-roofline --out results.json
    # the single-user baseline without an engine
    python benchmarks/serving/agentic.py --backend hf --model MODEL_DIR --hf-turns 2 --out hf.json
    # write the generated trace (tokenspeed-trie lengths JSONL), or re-plot a result
    python benchmarks/serving/agentic.py --write-trace trace.jsonl --num-trace 100
    python benchmarks/serving/agentic.py --replot results.json --baseline-json hf.json
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.serving.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
