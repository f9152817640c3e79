"""The engine with MTP speculative decoding on tiny DeepSeek-V3 models (CPU, fp32)."""

from __future__ import annotations

import random

import pytest

from tests.speculative.utils import (
    EOS,
    assert_pages_back,
    generate,
    greedy,
    make_engine,
    perfect_draft_model,
    random_mtp_model,
    random_prompts,
    run,
    tokens_of,
)
from tokenspeed_engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def model():
    return random_mtp_model(seed=1)


@pytest.fixture(scope="module")
def perfect():
    return perfect_draft_model(seed=2)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_output_is_identical_with_and_without_speculation(model, k):
    rng = random.Random(10 + k)
    prompts = random_prompts(rng, 7, 1, 40)
    plain, _, _, _ = generate(model, 0, prompts, greedy(23, ignore_eos=True))
    spec, outs, engine, _ = generate(model, k, prompts, greedy(23, ignore_eos=True))
    assert spec == plain
    assert all(len(t) == 23 for t in spec.values())
    assert all(o[-1].finish_reason == "length" for o in outs.values())
    assert engine.spec.stats.verify_steps > 0
    assert_pages_back(engine)


def test_greedy_identity_with_chunked_prefill_prefix_hits_and_retraction(model):
    """A small token budget (chunks, k+1 tokens per decode), shared prefixes (cache hits, also on the MTP
    cache) and a pool too small for everyone (retraction and recompute) change nothing."""
    rng = random.Random(3)
    shared = [rng.randrange(1, 211) for _ in range(21)]
    prompts = [shared[: rng.randrange(5, 22)] + p for p in random_prompts(rng, 8, 1, 15)]
    kw = dict(num_pages=40, batched_tokens=12, running=6)
    plain, _, e0, _ = generate(model, 0, prompts, greedy(30), **kw)
    spec, _, engine, _ = generate(model, 3, prompts, greedy(30), **kw)
    assert spec == plain
    stats = engine.scheduler.stats()
    assert stats.num_retractions > 0 and stats.prefix_hit_tokens > 0, stats.as_dict()
    assert_pages_back(engine)


def test_a_perfect_draft_is_always_accepted_and_emits_k_plus_1_tokens_per_step(perfect):
    model, f = perfect
    start = next(iter(f))
    prompt = [start]
    for _ in range(6):
        prompt.append(f[prompt[-1]])
    want = [f[prompt[-1]]]
    for _ in range(40):
        want.append(f[want[-1]])
    plain, _, _, steps0 = generate(model, 0, [prompt], greedy(41))
    assert plain[0] == want  # the construction: the target follows f
    spec, outs, engine, steps = generate(model, 3, [prompt], greedy(41))
    assert spec[0] == want
    # one prefill step (1 token), then every verify step emits 4: 40 tokens in 10 steps
    assert [len(o.token_ids) for o in outs[0]] == [1] + [4] * 10
    assert steps == 11 and steps0 == 41
    st = engine.spec.stats
    assert st.length_counts == [0, 0, 0, 0, 10] and st.mean_acceptance_length == 4.0
    assert outs[0][-1].spec_verify_steps == 10 and outs[0][-1].spec_accepted_tokens == 30
    assert_pages_back(engine)


def test_perfect_drafts_in_a_batch_with_truncation_at_eos_stop_and_length(perfect):
    """Accepted tokens past an EOS, a stop token, a stop string or max_tokens are dropped, exactly
    where plain decoding stops; the scheduler is told only the kept tokens."""
    model, f = perfect
    cycle = [next(iter(f))]
    while f[cycle[-1]] != cycle[0]:
        cycle.append(f[cycle[-1]])
    rng = random.Random(4)
    prompts = [[rng.choice(list(f)) for _ in range(rng.randrange(2, 9))] for _ in range(6)]
    chain = lambda p, n: [f[p[-1]]] + [None] * (n - 1)  # noqa: E731
    second = {}
    for i, p in enumerate(prompts):
        toks = chain(p, 12)
        for j in range(1, 12):
            toks[j] = f[toks[j - 1]]
        second[i] = toks
    params = [
        greedy(13),  # length, not a multiple of 4
        greedy(30, stop_token_ids=[second[1][5]]),  # stop token in the middle of an accepted run
        greedy(30, stop=[f"{second[2][6]} "]),  # stop string
        greedy(30, stop_token_ids=[second[3][2]], ignore_eos=True),
        greedy(2),
        greedy(30, stop_token_ids=[second[5][9]]),
    ]
    plain, outs0, _, _ = generate(model, 0, prompts, params)
    spec, outs, engine, _ = generate(model, 3, prompts, params)
    assert spec == plain
    for rid in range(6):
        assert outs[rid][-1].finish_reason == outs0[rid][-1].finish_reason
        assert "".join(o.text for o in outs[rid]) == "".join(o.text for o in outs0[rid])
    assert len(spec[0]) == 13 and spec[1][-1] == second[1][5] and len(spec[4]) == 2
    assert_pages_back(engine)


def test_eos_ends_a_request_inside_an_accepted_run(perfect):
    model, f = perfect
    # a prompt whose f-chain reaches the EOS-free start again is not needed: make EOS the 6th token
    start = next(iter(f))
    chain = [f[start]]
    for _ in range(10):
        chain.append(f[chain[-1]])
    engine = make_engine(model, 3)
    engine.eos_token_ids = {chain[5]}
    engine.add_request(1, [start], greedy(30))
    outs, _ = run(engine)
    assert tokens_of(outs)[1] == chain[:6] and outs[1][-1].finish_reason == "stop"
    assert EOS not in chain[:6] or chain[5] == EOS
    assert_pages_back(engine)


def test_sampling_is_seed_reproducible_and_mixes_with_greedy(model):
    rng = random.Random(5)
    prompts = random_prompts(rng, 5, 2, 20)
    params = [SamplingParams(max_tokens=15, temperature=0.8, top_k=30, seed=11 + i) if i % 2 else greedy(15) for i in range(5)]
    a, _, engine, _ = generate(model, 3, prompts, params)
    b, _, _, _ = generate(model, 3, prompts, params)
    plain, _, _, _ = generate(model, 0, prompts, params)
    assert a == b
    for i in range(0, 5, 2):  # the greedy requests are unaffected by their sampling neighbours
        assert a[i] == plain[i]
    assert all(len(t) == 15 for t in a.values())
    assert_pages_back(engine)


def test_metrics_lines_and_per_request_stats(perfect):
    model, f = perfect
    start = next(iter(f))
    _, outs, engine, _ = generate(model, 2, [[start], [f[start]]], greedy(10))
    lines = engine.spec.stats.prometheus_lines()
    values = {ln.split()[0]: float(ln.split()[1]) for ln in lines if not ln.startswith("#")}
    assert values["tokenspeed_spec_num_steps"] == 2
    v = values["tokenspeed_spec_verify_steps_total"]
    assert v == sum(o[-1].spec_verify_steps for o in outs.values()) > 0
    assert values["tokenspeed_spec_accepted_tokens_total"] == 2 * v == values["tokenspeed_spec_draft_tokens_total"]
    assert values["tokenspeed_spec_mean_acceptance_length"] == 3.0
    assert values['tokenspeed_spec_acceptance_length_bucket{le="2"}'] == 0
    assert values['tokenspeed_spec_acceptance_length_bucket{le="3"}'] == v


def test_bad_configurations_are_refused_with_the_argument_named():
    from tests.speculative.utils import IdTokenizer, tiny_config
    from tokenspeed_engine.engine import Engine, EngineConfig
    from tokenspeed_engine.model_runner import TorchModelRunner
    from tokenspeed_engine.models.configs import build_random_model

    m = random_mtp_model(seed=3)
    for bad in (-1, 8, 2.5, True):
        with pytest.raises(ValueError, match="speculative_num_steps"):
            make_engine(m, bad)
    plain = build_random_model(tiny_config(num_nextn_predict_layers=0), dtype=m.dtype, device="cpu", seed=0)
    with pytest.raises(ValueError, match="MTP"):
        make_engine(plain, 2)
    runner = TorchModelRunner(m, m.make_kv_cache(33, 4), num_pages=33, page_size=4, max_model_len=64, vocab_size=211)
    with pytest.raises(ValueError, match="overlap"):
        Engine(runner, IdTokenizer(), {0}, EngineConfig(speculative_num_steps=2, enable_overlap=True))


@pytest.mark.parametrize("max_bs", [1, 4])
def test_static_buffer_forwards_of_the_cuda_graphs_match(model, max_bs):
    """The graphed path's buffer loading and padding, run eagerly on the CPU (the capture itself
    needs a GPU; scripts/device_mtp.sh checks it): the same tokens as plain greedy decoding, with
    batches below, at and above the largest bucket (above: the eager path)."""
    from tokenspeed_engine.speculative.graphs import SpecGraphs

    rng = random.Random(7)
    prompts = random_prompts(rng, 6, 1, 30)
    params = [greedy(5 + 4 * i, ignore_eos=True) for i in range(6)]  # the batch shrinks 6, 5, .., 1
    plain, _, _, _ = generate(model, 0, prompts, params)
    engine = make_engine(model, 3)
    graphs = engine.spec.graphs = SpecGraphs.create(engine.spec, max_bs, engine.runner.max_model_len, capture=False)
    used = {"verify": 0, "mtp_verified": 0, "mtp_step": 0}
    for name in used:
        fn = getattr(graphs, name)

        def counted(*a, _fn=fn, _name=name):
            used[_name] += 1
            return _fn(*a)

        setattr(graphs, name, counted)
    for rid, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(rid, p, sp)
    outs, _ = run(engine)
    assert tokens_of(outs) == plain
    assert used["verify"] > 0 and used["mtp_verified"] == used["verify"] and used["mtp_step"] == 2 * used["verify"]
    assert_pages_back(engine)
