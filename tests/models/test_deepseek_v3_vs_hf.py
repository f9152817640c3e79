"""DeepseekV3ForCausalLM against Hugging Face transformers (fp32, CPU): prefill, paged decode,
chunked prefill, batches with random page order, speculative-verify decode."""

from __future__ import annotations

import torch

from tests.models.utils import PagedDriver, Seq, hf_greedy, rel_err
from tokenspeed_engine.forward_batch import ForwardMode
from tokenspeed_engine.models import load_model

TOL = 1e-4


def _load(path):
    return load_model(path, dtype=torch.float32, device="cpu", progress=False)


def test_prefill_and_ten_decode_steps_match_hf(deepseek_ckpt):
    hf, path = deepseek_ckpt
    model = _load(path)
    prompt = torch.randint(0, hf.config.vocab_size, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    ref_prefill, ref_steps, ref_tokens = hf_greedy(hf, prompt, steps=10)

    drv, seq = PagedDriver(model, seed=4), Seq([])
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


def test_chunked_prefill_matches_hf(deepseek_ckpt):
    hf, path = deepseek_ckpt
    model = _load(path)
    prompt = torch.randint(0, hf.config.vocab_size, (14,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf(torch.tensor([prompt])).logits[0]
    drv, seq = PagedDriver(model, seed=6), Seq([])
    first = drv.run([seq], [prompt[:6]], ForwardMode.EXTEND)  # the second chunk attends to a cached prefix
    second = drv.run([seq], [prompt[6:]], ForwardMode.EXTEND)
    assert rel_err(first, ref[:6]) < TOL
    assert rel_err(second, ref[6:]) < TOL
    last = drv.run([seq], [[int(second[-1].argmax())]], ForwardMode.DECODE)
    ref_next = hf(torch.tensor([seq.tokens])).logits[0, -1]
    assert rel_err(last[0], ref_next) < TOL


def test_batch_of_different_lengths_with_random_pages(deepseek_ckpt):
    hf, path = deepseek_ckpt
    model = _load(path)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 12, 9)]
    drv = PagedDriver(model, seed=8)
    seqs = [Seq([]) for _ in prompts]
    out = drv.run(seqs, prompts, ForwardMode.EXTEND)
    starts = [0, 5, 17, 26]
    refs = [hf_greedy(hf, p, steps=10) for p in prompts]
    for b in range(3):
        assert rel_err(out[starts[b] : starts[b + 1]], refs[b][0]) < TOL
    # pages of different sequences interleave in the pool: the block tables are not contiguous
    assert any(abs(a - b) > 1 for s in seqs for a, b in zip(s.pages, s.pages[1:], strict=False))
    last = [int(out[starts[b + 1] - 1].argmax()) for b in range(3)]
    for step in range(10):
        logits = drv.run(seqs, [[t] for t in last], ForwardMode.DECODE, all_logits=False)
        for b in range(3):
            assert rel_err(logits[b], refs[b][1][step]) < TOL, f"seq {b} step {step}"
        last = [int(x.argmax()) for x in logits]
        assert last == [refs[b][2][step + 1] for b in range(3)]


def test_speculative_verify_decode_q_len_3(deepseek_ckpt):
    """DECODE with q_len = 3 per sequence (causal inside the draft) equals HF on the extended sequences."""
    hf, path = deepseek_ckpt
    model = _load(path)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (6, 10)]
    drafts = [torch.randint(0, hf.config.vocab_size, (3,), generator=gen).tolist() for _ in prompts]
    drv = PagedDriver(model, seed=10)
    seqs = [Seq([]) for _ in prompts]
    drv.run(seqs, prompts, ForwardMode.EXTEND)
    out = drv.run(seqs, drafts, ForwardMode.DECODE)
    for b in range(2):
        ref = hf(torch.tensor([prompts[b] + drafts[b]])).logits[0, -3:]
        assert rel_err(out[3 * b : 3 * b + 3], ref) < TOL


def test_last_token_logits_and_hidden(deepseek_ckpt):
    hf, path = deepseek_ckpt
    model = _load(path)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    drv = PagedDriver(model, seed=11)
    logits, hidden = drv.run([Seq([]), Seq([])], prompts, ForwardMode.EXTEND, all_logits=False, return_hidden=True)
    assert logits.shape == (2, hf.config.vocab_size) and hidden.shape == (8, hf.config.hidden_size)
    for b, p in enumerate(prompts):
        out = hf(torch.tensor([p]), output_hidden_states=True)
        assert rel_err(logits[b], out.logits[0, -1]) < TOL
        rows = hidden[:5] if b == 0 else hidden[5:]
        assert rel_err(rows, out.hidden_states[-1][0]) < TOL
