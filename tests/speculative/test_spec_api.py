"""--speculative-num-steps on the CLI, the LLM API, and the acceptance metrics on /metrics."""

from __future__ import annotations

import asyncio

import pytest

from tests.speculative.utils import greedy, make_engine, perfect_draft_model, tiny_config
from tokenspeed_engine import cli
from tokenspeed_engine.llm import LLM
from tokenspeed_engine.random_checkpoint import write_random_checkpoint
from tokenspeed_engine.server.async_engine import AsyncEngine


def test_cli_flag_parses_travels_to_replicas_and_is_validated(capsys) -> None:
    args = cli.build_parser().parse_args(["serve", "--speculative-num-steps", "3", "--dp", "2"])
    assert args.speculative_num_steps == 3
    assert cli.build_parser().parse_args(["serve", *cli.replica_argv(args)]).speculative_num_steps == 3
    assert cli.build_parser().parse_args(["serve"]).speculative_num_steps == 0
    assert cli.serve(cli.build_parser().parse_args(["serve", "--speculative-num-steps", "9"])) == 2
    assert "--speculative-num-steps must be in 0..7" in capsys.readouterr().err


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("random_mtp"), tiny_config().to_hf())


def test_llm_api_speculative_equals_plain_greedy(random_dir) -> None:
    kw = dict(device="cpu", dtype="float32", kv_cache_tokens=512, max_model_len=128, load_format="random")
    plain, spec = LLM(str(random_dir), **kw), LLM(str(random_dir), speculative_num_steps=2, **kw)
    assert spec.engine.spec is not None and spec.engine.spec.k == 2 and not spec.engine.overlap
    assert spec.engine.scheduler.config.decode_width == 3
    params = greedy(12, ignore_eos=True)
    prompts = ["w5 w9 w77", "w3", "w100 w101 w102 w103 w104 w105 w106"]
    a, b = plain.generate(prompts, params), spec.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # same seeded main weights, MTP layer added
    assert all(c.spec_verify_steps > 0 for c in b) and all(c.spec_verify_steps == 0 for c in a)
    with pytest.raises(ValueError, match="overlap"):
        LLM(str(random_dir), speculative_num_steps=2, enable_overlap=True, **kw)
    with pytest.raises(ValueError, match="tp = 1"):
        LLM(str(random_dir), speculative_num_steps=2, tp=2, **kw)


def test_metrics_endpoint_reports_acceptance_length() -> None:
    model, f = perfect_draft_model(seed=2)
    engine = AsyncEngine(make_engine(model, 3))
    try:
        start = next(iter(f))

        async def go():
            return [o async for o in engine.generate([start], greedy(9))]

        outs = asyncio.run(go())
        assert sum(len(o.token_ids) for o in outs) == 9
        text = engine.metrics.render(engine.gauges())
    finally:
        engine.shutdown()
    assert "# TYPE tokenspeed_spec_accepted_tokens_total counter" in text
    assert "tokenspeed_spec_mean_acceptance_length 4.0" in text  # 8 tokens after the prefill: 2 verifies of 4
    assert "tokenspeed_spec_verify_steps_total 2" in text
    assert 'tokenspeed_spec_acceptance_length_bucket{le="4"} 2' in text
