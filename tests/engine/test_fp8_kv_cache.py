"""``--kv-cache-dtype fp8``: the e4m3 latent cache of MLA models, end to end on the CPU.

* Sizing: at the same memory budget the pool holds twice the tokens (the startup log's count).
* Semantics: an engine on the fp8 cache produces exactly what an fp32-cache engine produces when
  every latent it writes is first rounded to e4m3 (quantise on store; decode reads the codes,
  chunked prefill reads the cached prefix dequantised, through the same values).
* Accuracy: greedy generations of a small random DeepSeek-V3 with the real MLA row (512 latent +
  64 rope) on fp8 against fp32 and bf16 caches. Random weights make greedy decoding chaotic
  (near-tied logits, router flips), so whole-sequence agreement is reported, and what is
  asserted is the per-step top-1 agreement under teacher forcing, with a corrupted cache as the
  control that the measure can fail.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

import tokenspeed_engine.models.deepseek_v3 as deepseek_v3
from tests.engine.tiny_models import engine_for, run_engine, runner_for, tiny_deepseek_config
from tokenspeed_engine import cli, launch
from tokenspeed_engine.forward_batch import ForwardMode, SequenceInput, build_forward_batch
from tokenspeed_engine.kv_cache import MLAKVCache, kv_pool_tokens, resolve_kv_cache_dtype, set_kv_cache_dtype
from tokenspeed_engine.models.configs import build_random_model
from tokenspeed_engine.sampling import SamplingParams

F8 = torch.float8_e4m3fn
# Moonlight's MLA dims (kv_lora_rank 512, rope 64: the 576-value row) in a CPU-sized model with
# Moonlight's layout (a dense first layer, then MoE layers with a shared expert)
MLA_576 = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, num_attention_heads=4,
               hidden_size=128)  # fmt: skip
PROMPTS, NEW_TOKENS, PAGE = 32, 32, 16


def mla_model(dtype: torch.dtype = torch.float32, seed: int = 1):
    return build_random_model(tiny_deepseek_config(**MLA_576), dtype=dtype, device="cpu", seed=seed, std=0.05)


def test_fp8_cache_layout_and_bytes() -> None:
    model = mla_model(torch.bfloat16)
    bf16_bytes = model.kv_bytes_per_token()
    assert set_kv_cache_dtype(model, "fp8") == F8
    kv = model.make_kv_cache(3, PAGE)
    assert isinstance(kv, MLAKVCache) and kv[0].dtype == F8 and kv[0].shape == (3, PAGE, 576)
    assert kv.scale(0).dtype == torch.float32 and kv.scale(0).shape == (1,) and float(kv.scale(0)) == 1.0
    assert model.kv_bytes_per_token() * 2 == bf16_bytes == len(kv) * 576 * 2
    assert set_kv_cache_dtype(model, "auto") == torch.bfloat16 and model.make_kv_cache(2, PAGE).scale(0) is None
    assert resolve_kv_cache_dtype("bf16", torch.float32) == torch.bfloat16
    assert kv_pool_tokens(10 * 2**30, 61 * 576) == 2 * kv_pool_tokens(10 * 2**30, 61 * 576 * 2) + 1  # 305,556 vs 152,777


def test_pool_doubles_at_the_same_budget(monkeypatch, caplog) -> None:
    """launch's sizing from free GPU memory (the CUDA query faked): the logged token count doubles."""
    model = mla_model(torch.bfloat16)
    total, free = 80 * 2**30, 60 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    tokens = {}
    for name in ("bf16", "fp8"):
        set_kv_cache_dtype(model, name)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tokenspeed.launch"):
            pages = launch._num_pages(model, torch.device("cuda"), PAGE, None, 0.9)
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV pool:"))
        tokens[name] = int(line.split()[2])
        assert tokens[name] == (pages - 1) * PAGE
    budget = free - 0.1 * total
    assert tokens["bf16"] == kv_pool_tokens(budget, model.config.num_hidden_layers * 576 * 2) // PAGE * PAGE
    assert tokens["fp8"] in (2 * tokens["bf16"], 2 * tokens["bf16"] + PAGE)  # up to one page of rounding


def test_flag_parses_travels_and_is_validated(tmp_path) -> None:
    args = cli.build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8", "--dp", "2"])
    assert args.kv_cache_dtype == "fp8"
    assert cli.build_parser().parse_args(["serve", *cli.replica_argv(args)]).kv_cache_dtype == "fp8"
    assert cli.build_parser().parse_args(["serve"]).kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        launch.build_engine(str(tmp_path), kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="needs an MLA model"):
        set_kv_cache_dtype(type("Llamaish", (), {"dtype": torch.bfloat16})(), "fp8")


def _prompts(n: int = PROMPTS, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 211) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


def _generate(model, prompts: list[list[int]]) -> dict[int, list[int]]:
    engine = engine_for(runner_for(model, num_pages=600, page_size=PAGE, max_model_len=256), overlap=False,
                        batched_tokens=512, running=len(prompts), eos=-1)  # fmt: skip
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(i, prompt, params)
    return {rid: sum((o.token_ids for o in outs), []) for rid, outs in run_engine(engine).items()}


def _rounded_writes(monkeypatch, transform) -> None:
    """Make the attention layer write ``transform(latents)`` (into a 16/32-bit cache): through the
    separate norm / rotary / write_paged_kv path, the fused latent write switched off."""
    monkeypatch.setattr(deepseek_v3.DeepseekV3Attention, "_latent_write_kernel", staticmethod(lambda latent, cache: None))
    write = deepseek_v3.write_paged_kv
    monkeypatch.setattr(deepseek_v3, "write_paged_kv", lambda c, s, v, scale=None: write(c, s, transform(v), scale))


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    return v.float().clamp(-448, 448).to(F8).float()


def test_fp8_engine_equals_fp32_engine_on_e4m3_rounded_latents(monkeypatch) -> None:
    model = mla_model()
    set_kv_cache_dtype(model, "fp8")
    fp8 = _generate(model, _prompts(12))
    set_kv_cache_dtype(model, "auto")
    _rounded_writes(monkeypatch, _e4m3)
    simulated = _generate(model, _prompts(12))
    assert fp8 == simulated


def test_chunked_prefill_over_an_fp8_prefix_matches_one_shot_prefill_and_decode() -> None:
    """The same prompt as one prefill, as two chunks (the second reads the cached fp8 prefix), and as
    a prefill plus decode steps: the last token's logits agree to fp32 rounding."""
    model = mla_model()
    set_kv_cache_dtype(model, "fp8")
    ids = [random.Random(3).randrange(1, 211) for _ in range(45)]
    pages = list(range(1, 5))

    def run(splits: list[int]) -> torch.Tensor:
        kv = model.make_kv_cache(8, PAGE)
        done = 0
        with torch.inference_mode():
            for end in splits:
                mode = ForwardMode.DECODE if end - done == 1 and done > 0 else ForwardMode.EXTEND
                logits = model(build_forward_batch([SequenceInput(done, ids[done:end], pages)], PAGE, mode), kv)
                done = end
        return logits.float()

    one_shot = run([45])
    for splits in ([20, 45], [17, 33, 45], [42, 43, 44, 45]):
        other = run(splits)
        rel = float((other - one_shot).norm() / one_shot.norm())
        assert rel < 1e-5, f"chunks {splits}: relative difference {rel:.2e}"


def _teacher_forced_top1(model, sequences: list[list[int]], prompt_lens: list[int]) -> list[bool]:
    """Per decode step, whether the model's top-1 equals the next token of ``sequences`` (which hold the
    reference's greedy continuation), feeding the reference tokens whatever the model predicts."""
    kv = model.make_kv_cache(1 + sum(-(-len(s) // PAGE) for s in sequences), PAGE)
    pages, nxt = [], 1
    for s in sequences:
        n = -(-len(s) // PAGE)
        pages.append(list(range(nxt, nxt + n)))
        nxt += n
    hits = []
    with torch.inference_mode():
        seqs = [SequenceInput(0, s[:p], pg) for s, p, pg in zip(sequences, prompt_lens, pages, strict=True)]
        logits = model(build_forward_batch(seqs, PAGE, ForwardMode.EXTEND), kv)
        for step in range(NEW_TOKENS):
            top = logits.argmax(-1).tolist()
            hits += [t == s[p + step] for t, s, p in zip(top, sequences, prompt_lens, strict=True)]
            if step + 1 == NEW_TOKENS:
                break
            seqs = [SequenceInput(p + step, s[p + step : p + step + 1], pg)
                    for s, p, pg in zip(sequences, prompt_lens, pages, strict=True)]  # fmt: skip
            logits = model(build_forward_batch(seqs, PAGE, ForwardMode.DECODE), kv)
    return hits


def test_greedy_generations_fp8_against_fp32_and_bf16(monkeypatch, capsys) -> None:
    model = mla_model()
    prompts = _prompts()
    prompt_lens = [len(p) for p in prompts]
    runs = {}
    for name in ("auto", "bf16", "fp8"):
        set_kv_cache_dtype(model, name)
        runs[name] = _generate(model, prompts)
    ref = runs["auto"]  # fp32 cache
    full = {name: sum(runs[name][i] == ref[i] for i in ref) / len(ref) for name in ("bf16", "fp8")}
    fp8_vs_bf16 = sum(runs["fp8"][i] == runs["bf16"][i] for i in ref) / len(ref)
    first_diff = sorted(
        next((j for j, (a, b) in enumerate(zip(runs["fp8"][i], ref[i], strict=True)) if a != b), NEW_TOKENS) for i in ref
    )

    sequences = [prompts[i] + ref[i] for i in range(PROMPTS)]
    set_kv_cache_dtype(model, "fp8")
    step_fp8 = _teacher_forced_top1(model, sequences, prompt_lens)
    set_kv_cache_dtype(model, "auto")
    _rounded_writes(monkeypatch, lambda v: _e4m3(v) * 2)  # control: an fp8 cache read back with twice its scale
    step_broken = _teacher_forced_top1(model, sequences, prompt_lens)
    rate_fp8, rate_broken = sum(step_fp8) / len(step_fp8), sum(step_broken) / len(step_broken)
    with capsys.disabled():
        print(f"\n[fp8 KV, {PROMPTS} prompts x first {NEW_TOKENS} greedy tokens] identical sequences: fp8 vs fp32 cache "
              f"{full['fp8']:.0%}, fp8 vs bf16 {fp8_vs_bf16:.0%}, bf16 vs fp32 {full['bf16']:.0%}; first divergence "
              f"of fp8 (sorted) {first_diff}; teacher-forced top-1 agreement per step: fp8 {rate_fp8:.1%}, "
              f"corrupted-scale control {rate_broken:.1%}")  # fmt: skip
    assert rate_fp8 >= 0.9, f"fp8 top-1 agreement per step {rate_fp8:.1%}"
    assert rate_broken < rate_fp8 - 0.1, "the control should fail clearly: is the measure blind?"


def test_llm_with_an_fp8_cache(tmp_path, caplog) -> None:
    """The option travels from build_engine (as LLM passes it) to the runner's cache, and serves."""
    from tokenspeed_engine.llm import LLM
    from tokenspeed_engine.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path, tiny_deepseek_config(**MLA_576).to_hf())
    kw = dict(device="cpu", dtype="float32", kv_cache_tokens=512, max_model_len=128, load_format="random")
    with caplog.at_level(logging.INFO):
        llm = LLM(str(path), kv_cache_dtype="fp8", **kw)
    cache = llm.engine.runner.kv_cache
    assert cache[0].dtype == F8 and cache.scale(0) is not None
    assert any("KV cache dtype: float8_e4m3fn" in r.getMessage() for r in caplog.records)
    assert any("mla_decode=native_cpu" in r.getMessage() for r in caplog.records)
    out = llm.generate("w5 w9 w77", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6
