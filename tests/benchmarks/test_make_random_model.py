"""The random checkpoint loads the same into tokenspeed and into Hugging Face transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.serving.make_random_model import MARKER, make_random_model
from tests.benchmarks.conftest import tiny_config
from tokenspeed_engine.models import load_model
from tokenspeed_engine.models.configs import build_random_model
from tokenspeed_engine.models.hf_export import hf_reference_logits
from tokenspeed_engine.tokenizer import load_tokenizer


def test_checkpoint_round_trips_through_both_loaders(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    ref = build_random_model(tiny_config(), dtype=torch.float32, device="cpu", seed=3)
    ours = load_model(tiny_model_dir, dtype=torch.float32, device="cpu", progress=False)
    want, got = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert want.keys() == got.keys()
    for name, p in want.items():
        assert torch.equal(p, got[name]), name
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, 500, (19,)).tolist()
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0]
    expected = hf_reference_logits(ref, tokens)
    assert float((logits - expected).abs().max() / expected.abs().max()) < 1e-5
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["max_position_embeddings"] == 1024
    assert (Path(tiny_model_dir) / MARKER).is_file()


def test_word_tokenizer_round_trips_every_id(tiny_model_dir) -> None:
    tok = load_tokenizer(tiny_model_dir)
    ids = torch.randint(0, 500, (300,)).tolist()
    text = tok.decode(ids)
    assert tok.encode(text) == ids and tok.eos_token_ids == set()
    assert all(tok.decode([i]) for i in range(500))  # every token streams some text


def test_second_call_reuses_the_directory(tiny_model_dir) -> None:
    assert make_random_model(tiny_model_dir, tiny_config(), torch.float32, "cpu", seed=3)["reused"]
