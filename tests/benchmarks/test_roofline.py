"""The roofline model's arithmetic on a tiny DeepSeek-V3 config, computed by hand."""

from __future__ import annotations

import json

import pytest

from benchmarks.serving import roofline as rl
from benchmarks.serving.trace import WorkloadShape

TINY = {
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "hidden_size": 8, "num_attention_heads": 2, "q_lora_rank": None,
    "qk_nope_head_dim": 4, "qk_rope_head_dim": 2, "v_head_dim": 4, "kv_lora_rank": 6, "intermediate_size": 10,
    "moe_intermediate_size": 3, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "vocab_size": 20, "torch_dtype": "bfloat16",
}  # fmt: skip
# per layer: q 8*2*6=96, kv_a 8*(6+2)=64, kv_b 6*2*(4+4)=96, o 2*4*8=64 -> 320 attention weights
# dense MLP 3*8*10=240; expert 3*8*3=72; router 8*4=32; shared expert 72; LM head 20*8=160
DENSE_PER_TOKEN = 3 * 320 + 240 + 2 * (32 + 72) + 160  # 1568
ACTIVE = DENSE_PER_TOKEN + 2 * 2 * 72  # two MoE layers, top-2


def test_parameter_counts_by_hand(tmp_path) -> None:
    m = rl.ModelShape.from_config(TINY)
    assert m.moe_layers == 2 and m.attention_params == 320 and m.expert_params == 72
    assert m.dense_params_per_token == DENSE_PER_TOKEN == 1568 and m.active_params_per_token == ACTIVE == 1856
    assert m.total_weight_bytes == (1568 + 160) * 2 + 2 * 4 * 72 * 2  # + embedding; all 4 experts
    assert m.kv_bytes_per_token == (6 + 2) * 2 * 3
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert rl.ModelShape.from_path(tmp_path) == rl.ModelShape.from_config(TINY, name=tmp_path.name)
    fp8 = rl.ModelShape.from_config({**TINY, "quantization_config": {"quant_method": "fp8"}})
    assert fp8.weight_bytes == 1 and fp8.expert_weight_bytes == 1
    with pytest.raises(ValueError, match="kv_lora_rank"):
        rl.ModelShape.from_config({k: v for k, v in TINY.items() if k != "kv_lora_rank"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        rl.ModelShape.from_path(tmp_path / "nowhere")


def test_step_bytes_flops_and_time_by_hand() -> None:
    m = rl.ModelShape.from_config(TINY)
    assert m.distinct_experts(1) == pytest.approx(2.0) and m.distinct_experts(2) == pytest.approx(3.0)
    assert m.distinct_experts(10_000) == pytest.approx(4.0)
    w1 = 1568 * 2 + 2 * 2 * 72 * 2 + 1 * 8 * 2  # dense + 2 experts in 2 layers + one embedding row
    assert m.weight_bytes_read(1) == pytest.approx(w1)
    assert m.kv_bytes_read(2, 10) == 48 * 2 * 10
    # absorbed MLA: per layer and head, q.k over 512+64 -> here 6+2, p.v over 6: 2 flops each
    assert m.decode_flops(2, 10) == pytest.approx(2 * 2 * ACTIVE + 2 * 2 * 10 * 3 * 2 * (2 * 6 + 2))
    hw = rl.Hardware(copy_gbps=1.0, matmul_tflops=1e-9)  # 1e9 B/s, 1e3 FLOP/s: compute-bound
    st = rl.step_time(m, hw, 2, 10)
    assert st["bound"] == "compute" and st["time_s"] == pytest.approx(m.decode_flops(2, 10) / 1e3)
    b1 = rl.batch1_decode(m, rl.Hardware(1.0, 1.0), 100)
    assert b1["bytes_per_token"] == pytest.approx(w1 + 48 * 100) and b1["tokens_per_s"] == pytest.approx(1e9 / (w1 + 4800))


def test_prefill_share_and_frontier() -> None:
    m = rl.ModelShape.from_config(TINY)
    work = WorkloadShape(mean_decode_context=100, prefill_tokens_per_output=3, prefill_pairs_per_output=50, max_context=500)
    pre = 2 * 3 * ACTIVE + 2 * 50 * 3 * 2 * (6 + 4)  # non-absorbed prefill: q.k at 4+2, p.v at 4
    assert m.prefill_flops_per_output(work) == pytest.approx(pre)
    hw = rl.Hardware(copy_gbps=1e-3, matmul_tflops=1e-8)
    pts = rl.frontier(m, hw, work, batch_limit=300)
    for p in pts:
        st = rl.step_time(m, hw, p["batch"], 100, extra_flops=p["batch"] * pre)
        assert p["tokens_per_s_per_user"] == pytest.approx(1 / st["time_s"])
        assert p["tpm_per_gpu"] == pytest.approx(60 * p["batch"] / st["time_s"])
    users = [p["tokens_per_s_per_user"] for p in pts]
    assert users == sorted(users, reverse=True) and pts[-1]["batch"] == 300
    decode_only = rl.frontier(m, hw, work, include_prefill=False, batch_limit=300)
    assert all(d["tpm_per_gpu"] >= p["tpm_per_gpu"] for d, p in zip(decode_only, pts, strict=True))
    two = rl.frontier(m, hw, work, gpus=2, batch_limit=300)  # two GPUs: each step takes half as long
    assert two[0]["tokens_per_s_per_user"] == pytest.approx(2 * pts[0]["tokens_per_s_per_user"])
    assert two[0]["tpm_per_gpu"] == pytest.approx(pts[0]["tpm_per_gpu"])


def test_memory_caps_the_batch() -> None:
    m = rl.ModelShape.from_config(TINY)
    work = WorkloadShape(100, 0, 0, 100)
    free_for = 7  # sequences of 100 tokens at 48 B/token beside 4608 B of weights
    hw = rl.Hardware(1.0, 1.0, memory_bytes=(m.total_weight_bytes + free_for * 4800 + 100) / 0.9)
    assert rl.max_batch(m, hw, 100) == free_for
    assert [p["batch"] for p in rl.frontier(m, hw, work)] == list(range(1, free_for + 1))
    assert rl.summary(m, hw, work)["max_batch_by_memory"] == free_for


@pytest.mark.gpu
def test_measure_hardware_on_gpu() -> None:
    hw = rl.measure_hardware()
    assert hw.copy_gbps > 100 and hw.matmul_tflops > 1 and hw.memory_bytes > 0
