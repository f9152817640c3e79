"""Write a random-weight DeepSeek-V3 checkpoint (default: the Moonlight-16B-A3B shape) that both
``tokenspeed serve`` and Hugging Face ``from_pretrained`` load, with a word-level tokenizer.

The weights are drawn on the device by ``build_random_model`` and saved under the checkpoint's
own names (per-expert ``gate/up/down_proj``, as DeepSeek and Moonlight ship them), in shards
with an index. The tokenizer maps id i to the word ``t{i}`` (whitespace-split, no special
tokens), so every id decodes to text and text re-tokenises to the same ids: a benchmark can feed
the streamed output back as exact ids. ``max_position_embeddings`` may be raised (random weights
have no trained length) so that long agentic contexts fit.

    python -m benchmarks.serving.make_random_model --out /tmp/moonlight-random [--layers 27] [--max-position-embeddings 65536]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

MARKER = "tokenspeed_random_model.json"
# each turn's rendering extends the previous one's, so chat replays can hit the prefix cache
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"


def checkpoint_tensors(model: torch.nn.Module, config) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every parameter, split back into the checkpoint's layout."""
    from tokenspeed_engine.models.deepseek_v3_weights import DeepseekV3WeightMapper

    mapper = DeepseekV3WeightMapper(config, 0)
    for name, p in model.named_parameters():
        if name.endswith(".experts.w13") or name.endswith(".experts.w2"):
            for e in range(p.shape[0]):
                if name.endswith("w13"):
                    gate, up = p[e].chunk(2, dim=0)
                    yield mapper.reverse(name, (e, "gate")), gate
                    yield mapper.reverse(name, (e, "up")), up
                else:
                    yield mapper.reverse(name, (e, "down")), p[e]
        elif ".gate_up_proj." in name:
            gate, up = p.chunk(2, dim=0)
            yield mapper.reverse(name, 0), gate
            yield mapper.reverse(name, 1), up
        else:
            yield mapper.reverse(name, None), p


def save_checkpoint(model: torch.nn.Module, config, out: Path, shard_bytes: int = 4 << 30) -> int:
    """Shards ``model-0000k.safetensors`` + ``model.safetensors.index.json``; returns the bytes written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    files = 0

    def flush() -> None:
        nonlocal shard, size, files
        if shard:
            files += 1
            fname = f"model-{files:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, size = {}, 0

    with torch.no_grad():
        for name, t in checkpoint_tensors(model, config):
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > shard_bytes:
                flush()
            shard[name] = t.detach().to("cpu").contiguous()
            size += nbytes
            total += nbytes
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def save_word_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.chat_template = CHAT_TEMPLATE  # words outside the vocabulary (any real text) map to t0
    fast.save_pretrained(str(out))


def make_random_model(out: str | Path, config, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0) -> dict:
    """Build, save (checkpoint, config.json, tokenizer) and describe; skips the work when ``out`` holds
    a model written with the same arguments."""
    from tokenspeed_engine.models.configs import build_random_model

    out = Path(out)
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(dtype).replace("torch.", "")
    desc = {"config": hf_config, "seed": seed}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("request") == desc:
        return {**json.loads(marker.read_text()), "reused": True}
    t0 = time.perf_counter()
    model = build_random_model(config, dtype=dtype, device=device, seed=seed)
    t_build = time.perf_counter() - t0
    nbytes = save_checkpoint(model, config, out)
    (out / "config.json").write_text(json.dumps(hf_config, indent=1))
    save_word_tokenizer(out, config.vocab_size)
    del model
    info = {"request": desc, "bytes": nbytes, "build_s": t_build, "total_s": time.perf_counter() - t0}
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False}


def main(argv: list[str] | None = None) -> int:
    from tokenspeed_engine.models.configs import moonlight_16b_a3b_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: Moonlight's 27)")
    ap.add_argument("--max-position-embeddings", type=int, default=None, help="raise the context limit (default 8192)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    config = moonlight_16b_a3b_config()
    changes = {}
    if args.layers is not None:
        if args.layers < 2:
            ap.error("--layers must be >= 2 (one dense layer, then MoE layers)")
        changes["num_hidden_layers"] = args.layers
    if args.max_position_embeddings is not None:
        changes["max_position_embeddings"] = args.max_position_embeddings
    config = dataclasses.replace(config, **changes)
    info = make_random_model(args.out, config, getattr(torch, args.dtype), args.device, args.seed)
    verb = "reused" if info["reused"] else f"written in {info['total_s']:.1f} s"
    print(f"random DeepseekV3 ({config.num_hidden_layers} layers, {info['bytes'] / 2**30:.1f} GiB) at {args.out}: {verb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
