"""The serve / LLM options of issue 12's executor: CUDA graphs, overlap, --tp, random weights."""

from __future__ import annotations

import pytest

from tests.engine.tiny_models import tiny_deepseek_config
from tokenspeed_engine import cli, launch
from tokenspeed_engine.llm import LLM
from tokenspeed_engine.random_checkpoint import write_random_checkpoint
from tokenspeed_engine.sampling import SamplingParams


def test_cli_flags_travel_to_replicas() -> None:
    argv = ["serve", "--dp", "2", "--tp", "2", "--no-enable-overlap", "--disable-cuda-graph", "--cuda-graph-max-bs", "8",
            "--load-format", "random", "--model", "/m"]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    assert (args.tp, args.enable_overlap, args.disable_cuda_graph, args.cuda_graph_max_bs) == (2, False, True, 8)
    replica = cli.build_parser().parse_args(["serve", *cli.replica_argv(args)])
    for name in ("tp", "enable_overlap", "disable_cuda_graph", "cuda_graph_max_bs", "load_format", "model"):
        assert getattr(replica, name) == getattr(args, name), name
    defaults = cli.build_parser().parse_args(["serve"])
    assert defaults.enable_overlap is None and defaults.cuda_graph_max_bs == launch.DEFAULT_CUDA_GRAPH_MAX_BS
    assert "--enable-overlap" not in cli.replica_argv(defaults) and "--no-enable-overlap" not in cli.replica_argv(defaults)
    assert cli.LOAD_FORMATS == launch.LOAD_FORMATS


@pytest.mark.parametrize(
    "argv,message",
    [(["--tp", "0"], "--tp must be >= 1"), (["--cuda-graph-max-bs", "0"], "--cuda-graph-max-bs must be >= 1")],
)
def test_cli_rejects_bad_sizes(argv, message, capsys) -> None:
    assert cli.serve(cli.build_parser().parse_args(["serve", *argv])) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("random"), tiny_deepseek_config().to_hf())


def test_random_load_format_serves_a_config_without_weights(random_dir) -> None:
    kw = dict(device="cpu", dtype="float32", kv_cache_tokens=512, max_model_len=128, load_format="random")
    a, b = LLM(str(random_dir), **kw), LLM(str(random_dir), enable_overlap=True, **kw)
    assert not a.engine.overlap and b.engine.overlap  # overlap is off by default on the CPU
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out_a, out_b = a.generate("w5 w9 w77", params)[0], b.generate("w5 w9 w77", params)[0]
    assert out_a.token_ids == out_b.token_ids and len(out_a.token_ids) == 6  # seeded weights: the same model twice
    assert out_a.text.split() == [f"w{t}" for t in out_a.token_ids if t > 1]


def test_build_engine_validates_its_options(random_dir, tmp_path) -> None:
    kw = dict(device="cpu", kv_cache_tokens=256)
    with pytest.raises(ValueError, match="load_format must be one of"):
        launch.build_engine(str(random_dir), load_format="dummy", **kw)
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        launch.build_engine(str(random_dir), tp=0, load_format="random", **kw)
    with pytest.raises(ValueError, match="cuda_graph_max_bs must be >= 1"):
        launch.build_engine(str(random_dir), cuda_graph_max_bs=0, load_format="random", **kw)
    (tmp_path / "tokenizer.json").write_bytes((random_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes((random_dir / "tokenizer_config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="--load-format random needs"):
        launch.build_engine(str(tmp_path), load_format="random", **kw)
