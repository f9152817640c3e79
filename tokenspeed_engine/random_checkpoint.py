"""A servable model directory without weights: config.json plus a tokenizer covering the vocabulary.

``tokenspeed serve --model DIR --load-format random`` draws random weights for DIR's
config, so a benchmark or a device check can serve e.g. the Moonlight-16B-A3B shape with
no checkpoint on disk. The tokenizer is word-level: token i is the word ``w<i>`` (0 is
``<eos>``, 1 ``<unk>``), so any generated id decodes to text and ``"w5 w17"`` encodes to
``[5, 17]``. Also used by tests to give a tiny saved checkpoint a tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EOS, UNK = "<eos>", "<unk>"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"


def write_word_tokenizer(path: str | Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json in ``path`` for ids [0, vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
    vocab = {EOS: 0, UNK: 1} | {f"w{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": 1 << 30,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_random_checkpoint(path: str | Path, hf_config: dict[str, Any]) -> Path:
    """config.json (an HF config dict, e.g. ``moonlight_16b_a3b_config().to_hf()``) and the tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=1))
    write_word_tokenizer(path, int(hf_config["vocab_size"]))
    return path
