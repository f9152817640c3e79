"""LlamaForCausalLM (GQA, tied embeddings) against Hugging Face transformers (fp32, CPU)."""

from __future__ import annotations

import torch

from tests.models.utils import PagedDriver, Seq, hf_greedy, rel_err
from tokenspeed_engine.forward_batch import ForwardMode
from tokenspeed_engine.models import load_model

TOL = 1e-4


def _load(path):
    model = load_model(path, dtype=torch.float32, device="cpu", progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2
    return model


def test_prefill_and_ten_decode_steps_match_hf(llama_ckpt):
    hf, path = llama_ckpt
    model = _load(path)
    prompt = torch.randint(0, hf.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_prefill, ref_steps, ref_tokens = hf_greedy(hf, prompt, steps=10)
    drv, seq = PagedDriver(model, seed=2), Seq([])
    logits = drv.run([seq], [prompt], ForwardMode.EXTEND)
    assert rel_err(logits, ref_prefill) < TOL
    tokens = [int(logits[-1].argmax())]
    for step in range(10):
        out = drv.run([seq], [[tokens[-1]]], ForwardMode.DECODE)
        assert rel_err(out[0], ref_steps[step]) < TOL, f"decode step {step}"
        tokens.append(int(out[0].argmax()))
    assert tokens == ref_tokens
    greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=11, do_sample=False)[0, len(prompt) :].tolist()
    assert tokens == greedy


def test_chunked_prefill_and_batch_with_random_pages(llama_ckpt):
    hf, path = llama_ckpt
    model = _load(path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (4, 13, 9)]
    drv = PagedDriver(model, seed=4)
    seqs = [Seq([]) for _ in prompts]
    # chunk 1 of every prompt, then chunk 2 over the cached prefixes (different lengths)
    cut = [2, 7, 3]
    first = drv.run(seqs, [p[:c] for p, c in zip(prompts, cut, strict=True)], ForwardMode.EXTEND)
    second = drv.run(seqs, [p[c:] for p, c in zip(prompts, cut, strict=True)], ForwardMode.EXTEND)
    refs = [hf_greedy(hf, p, steps=10) for p in prompts]
    o1 = o2 = 0
    for b, (p, c) in enumerate(zip(prompts, cut, strict=True)):
        assert rel_err(first[o1 : o1 + c], refs[b][0][:c]) < TOL
        assert rel_err(second[o2 : o2 + len(p) - c], refs[b][0][c:]) < TOL
        o1, o2 = o1 + c, o2 + len(p) - c
    last = [refs[b][2][0] for b in range(3)]
    for step in range(10):
        logits = drv.run(seqs, [[t] for t in last], ForwardMode.DECODE, all_logits=False)
        for b in range(3):
            assert rel_err(logits[b], refs[b][1][step]) < TOL, f"seq {b} step {step}"
        last = [int(x.argmax()) for x in logits]
        assert last == [refs[b][2][step + 1] for b in range(3)]
