"""The agentic benchmark end to end: our server on loopback with a tiny random DeepSeek-V3 on CPU
(the real engine, scheduler, prefix cache and HTTP stack), the HF baseline, re-plotting, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.serving.cli import main
from tokenspeed_engine.engine import EngineConfig
from tokenspeed_engine.launch import build_engine
from tokenspeed_engine.server.app_runner import BackgroundServer, free_port
from tokenspeed_engine.server.async_engine import AsyncEngine
from tokenspeed_engine.server.openai_api import OpenAIServer

TINY_TRACE = ["--first-turn-tokens", "100", "--later-turn-tokens", "20", "--min-turns", "3", "--max-turns", "4",
              "--output-tokens", "12", "--no-progress"]  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    engine, tok, name = build_engine(
        tiny_model_dir, device="cpu", dtype="float32", kv_cache_tokens=4096, page_size=16, engine_config=EngineConfig(256, 16)
    )
    async_engine = AsyncEngine(engine)
    with BackgroundServer(OpenAIServer(async_engine, name, tok.encode, tok.chat)) as bg:
        yield bg
    async_engine.shutdown()


def test_sweep_writes_json_and_plot_with_cache_hits(served, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "agentic.json"
    rc = main(["--base-url", served.url, "--concurrency", "1,3", *TINY_TRACE, "--tokenizer", tiny_model_dir,
               "--out", str(out), "--requests-out", str(tmp_path / "req.jsonl"), "--roofline-model", tiny_model_dir,
               "--copy-gbps", "3000", "--matmul-tflops", "700"])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["concurrency"] for r in res["runs"]] == [1, 3]
    for run in res["runs"]:
        assert run["errors"] == 0 and run["steady_state"]
        for key in ("tokens_per_s_per_user", "tpm_per_gpu", "mean_tpot_ms"):
            assert run[key] > 0, key
        assert run["tokens_per_s_per_user"] == pytest.approx(1000 / run["mean_tpot_ms"])
        for key in ("ttft_ms", "itl_ms"):
            assert 0 < run[key]["p50"] <= run[key]["p99"], key
        assert run["cache_reported"] and run["prefix_cache_hit_pct_cold"] < 20
        # turn 2+ re-sends turn 1's prompt and output: the server's prefix cache must serve most of it
        later = [v for t, v in run["prefix_cache_hit_pct_by_turn"].items() if int(t) >= 1]
        assert later and min(later) > 50, run["prefix_cache_hit_pct_by_turn"]
        # our server returns the generated ids, so the history is replayed exactly (no re-tokenising)
        fb = run["output_feedback"]
        assert fb["server_ids"] > 0 and fb["retokenized"] == 0 and fb["placeholder"] == 0, fb
    assert [f["floor_tokens_per_s"] for f in res["floors"]] == [70, 200] and res["envelope_non_steady_runs"] == []
    assert res["envelope"] and res["roofline"]["frontier"] and res["batch1"]["tokens_per_s"] > 0
    png = Path(res["plot"])
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
    lines = (tmp_path / "req.jsonl").read_text().splitlines()
    assert len(lines) == sum(r["requests"] for r in res["runs"])
    # replot, with the baseline of another run
    (tmp_path / "hf.json").write_text(
        json.dumps(
            {
                "hf_baseline": {
                    "tokens_per_s_per_user": 5.0,
                    "device": "cpu",
                    "dtype": "float32",
                    "ttft_ms_mean": 1.0,
                    "load_s": 0.1,
                }
            }
        )
    )
    assert main(["--replot", str(out), "--plot", str(tmp_path / "again.png"), "--baseline-json", str(tmp_path / "hf.json")]) == 0
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_MAGIC


def test_text_prompts_retokenised_and_placeholder_outputs(served, tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "text.json"
    assert main(["--base-url", served.url, "--concurrency", "2", *TINY_TRACE, "--tokenizer", tiny_model_dir,
                 "--prompt-format", "text", "--out", str(out)]) == 0  # fmt: skip
    run = json.loads(out.read_text())["runs"][0]
    assert run["errors"] == 0 and run["prefix_cache_hit_pct_warm"] > 50
    # a server that returns no ids (not asked for them): outputs are re-tokenised, else placeholders
    out = tmp_path / "retok.json"
    assert main(["--base-url", served.url, "--concurrency", "2", *TINY_TRACE, "--tokenizer", tiny_model_dir,
                 "--no-request-token-ids", "--out", str(out)]) == 0  # fmt: skip
    fb = json.loads(out.read_text())["runs"][0]["output_feedback"]
    assert fb["retokenized"] > 0 and fb["server_ids"] == 0, fb
    out = tmp_path / "ids.json"
    assert main(["--base-url", served.url, "--concurrency", "2", *TINY_TRACE, "--vocab-size", "500",
                 "--no-request-token-ids", "--out", str(out)]) == 0  # fmt: skip
    run = json.loads(out.read_text())["runs"][0]
    assert run["output_feedback"]["placeholder"] > 0 and run["prefix_cache_hit_pct_warm"] > 30


def test_unreachable_server_is_reported_not_lost(tmp_path) -> None:
    out = tmp_path / "down.json"
    rc = main(["--base-url", f"http://127.0.0.1:{free_port()}", "--model-name", "x", "--concurrency", "2", *TINY_TRACE,
               "--vocab-size", "500", "--out", str(out), "--request-timeout", "5"])  # fmt: skip
    assert rc == 1
    run = json.loads(out.read_text())["runs"][0]
    assert run["errors"] == run["requests"] == 4 and "ConnectError" in run["error_examples"][0]
    assert run["tokens_per_s_per_user"] is None and run["tpm_per_gpu"] is None


def test_bad_arguments_name_the_flag(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--concurrency", "0,2"])
    assert "--concurrency" in capsys.readouterr().err
    assert main(["--min-turns", "5", "--max-turns", "2", "--write-trace", str(tmp_path / "t.jsonl")]) == 2
    assert "max_turns" in capsys.readouterr().err


def test_write_trace(tmp_path, capsys) -> None:
    path = tmp_path / "t.jsonl"
    assert main(["--write-trace", str(path), "--num-trace", "5", "--length-scale", "0.01"]) == 0
    assert len(path.read_text().splitlines()) == 5 and '"conversations": 5' in capsys.readouterr().out


def test_hf_backend_single_user(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "hf.json"
    assert main(["--backend", "hf", "--model", tiny_model_dir, "--device", "cpu", "--dtype", "float32", *TINY_TRACE,
                 "--hf-turns", "2", "--out", str(out)]) == 0  # fmt: skip
    hf = json.loads(out.read_text())["hf_baseline"]
    assert [t["completion_tokens"] for t in hf["turns"]] == [12, 12]
    assert hf["turns"][1]["prompt_tokens"] > hf["turns"][0]["prompt_tokens"] + 12
    assert hf["tokens_per_s_per_user"] == pytest.approx(1000 / hf["mean_tpot_ms"]) and hf["tokens_per_s_per_user"] > 0


def test_openai_messages_trace_over_chat(served, tmp_path) -> None:
    convs = []
    for c in range(3):
        msgs = [{"role": "system", "content": "t5 t6 t7 " * 20}, {"role": "user", "content": f"t{c} t9 " * 10}]
        for k in range(3):
            msgs += [{"role": "assistant", "content": "t11 t12 " * 4, "output_tokens": 6},
                     {"role": "tool", "content": f"t{k} t13 " * 15}]  # fmt: skip
        convs.append(json.dumps({"id": f"chat{c}", "messages": msgs}))
    trace = tmp_path / "chat.jsonl"
    trace.write_text("\n".join(convs))
    out = tmp_path / "chat.json"
    assert main(["--base-url", served.url, "--concurrency", "1,2", "--trace-file", str(trace), "--no-progress",
                 "--output-tokens", "12", "--out", str(out), "--requests-out", str(tmp_path / "r.jsonl")]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    for run in res["runs"]:
        assert run["errors"] == 0 and run["prefix_cache_hit_pct_warm"] > 50
    reqs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    by_conv = [r for r in reqs if r["concurrency"] == 1 and r["conversation"] == "chat0"]
    assert [r["turn"] for r in by_conv] == [0, 1, 2, 3] and all(r["completion_tokens"] == 6 for r in by_conv[:3])
    assert by_conv[3]["completion_tokens"] == 12  # the trailing tool message: a turn of --output-tokens
    assert by_conv[3]["prompt_tokens"] > by_conv[2]["prompt_tokens"] > by_conv[0]["prompt_tokens"]
