"""Tiny DeepSeek-V3 models with an MTP layer, and an engine driver, for the speculative tests."""

from __future__ import annotations

import random

from tests.engine.tiny_models import VOCAB, IdTokenizer, run_engine_counted, tiny_deepseek_config
from tokenspeed_engine.engine import Engine, EngineConfig, RequestOutput
from tokenspeed_engine.model_runner import TorchModelRunner
from tokenspeed_engine.models.configs import DeepseekV3Config
from tokenspeed_engine.models.deepseek_mtp import build_random_mtp_model, make_perfect_draft_
from tokenspeed_engine.sampling import SamplingParams

EOS = 0


def tiny_config(**overrides) -> DeepseekV3Config:
    """The engine tests' tiny DeepSeek-V3 plus one NextN layer (itself MoE)."""
    return tiny_deepseek_config(**{"num_nextn_predict_layers": 1, **overrides})


def random_mtp_model(seed: int = 1, **overrides):
    # std 0.1: logits far enough apart that greedy choices are not near-ties
    return build_random_mtp_model(tiny_config(**overrides), seed=seed, std=0.1)


def perfect_draft_model(seed: int = 2, num_tokens: int = 48) -> tuple[object, dict[int, int]]:
    """A model whose MTP layer predicts the target's next token exactly on a token subset; returns (model, f)."""
    model = random_mtp_model(seed)
    tokens = random.Random(seed).sample(range(1, VOCAB), num_tokens)
    return model, make_perfect_draft_(model, tokens, seed=seed)


def make_engine(
    model,
    k: int,
    *,
    num_pages: int = 257,
    page_size: int = 4,
    max_model_len: int = 256,
    batched_tokens: int = 64,
    running: int = 16,
    prefix_cache: bool = True,
) -> Engine:
    kv = model.make_kv_cache(num_pages, page_size)
    runner = TorchModelRunner(
        model, kv, num_pages=num_pages, page_size=page_size, max_model_len=max_model_len, vocab_size=model.config.vocab_size
    )
    config = EngineConfig(batched_tokens, running, enable_prefix_cache=prefix_cache, speculative_num_steps=k)
    return Engine(runner, IdTokenizer(), {EOS}, config)


def run(engine: Engine, max_steps: int = 5000) -> tuple[dict[int, list[RequestOutput]], int]:
    """Step until every request finished: (request id -> its outputs, steps taken)."""
    return run_engine_counted(engine, max_steps)


def tokens_of(outs: dict[int, list[RequestOutput]]) -> dict[int, list[int]]:
    return {rid: [t for o in os for t in o.token_ids] for rid, os in outs.items()}


def generate(model, k: int, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], **engine_kw):
    """Run ``prompts`` through a fresh engine: (tokens per request, outputs, engine, steps)."""
    engine = make_engine(model, k, **engine_kw)
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for rid, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
        engine.add_request(rid, p, SamplingParams(**vars(sp)))
    outs, steps = run(engine)
    return tokens_of(outs), outs, engine, steps


def assert_pages_back(engine: Engine) -> None:
    s = engine.scheduler.stats()
    assert s.pages_used == 0 and s.pages_free + s.pages_cached == s.pages_total, s.as_dict()
    engine.scheduler.check_invariants()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def random_prompts(rng: random.Random, n: int, lo: int, hi: int, vocab=range(1, VOCAB)) -> list[list[int]]:
    vocab = list(vocab)
    return [[rng.choice(vocab) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]
