"""Two gloo processes equal one: tensor-parallel attention / MLP / MoE (TP and EP), attention data
parallelism, a token-split dense MLP, replicated KV heads and a padded vocabulary split."""

from __future__ import annotations

import pytest
import torch

from tests.models.utils import PagedDriver, Seq, build_hf, rel_err, tiny_deepseek_hf_config, tiny_llama_hf_config
from tests.spmd.dist_utils import run_distributed
from tokenspeed_engine.forward_batch import ForwardMode
from tokenspeed_engine.models import load_model
from tokenspeed_engine.spmd import ParallelConfig, ParallelContext

# the same two sequences on every rank, or (data-parallel attention) different ones per rank
BATCHES = [
    ([[5, 3, 8, 1, 9], [2, 7, 7, 4, 1, 6, 3, 3, 8]], [[11, 12], [13, 14], [15, 16]]),
    ([[9, 9, 1], [4, 4, 4, 4, 2, 2, 2]], [[21, 22], [23, 24], [25, 26]]),
    ([[30, 31, 32, 33, 34, 35]], [[40], [41], [42]]),
]
CASES = {
    "deepseek/tp2": ("deepseek", {"attn_tp": 2, "dense_tp": 2, "moe_tp": 2}),
    "deepseek/ep2": ("deepseek", {"attn_tp": 2, "dense_tp": 2, "moe_ep": 2}),
    "deepseek/attn_dp2+ep2": ("deepseek", {"attn_tp": 1, "dense_tp": 2, "moe_ep": 2}),
    "deepseek/tp2+token_split_dense": ("deepseek", {"attn_tp": 2, "dense_tp": 1, "moe_ep": 2}),
    "llama/tp2": ("llama", {}),
    "llama_kv1/tp2_replicated_kv": ("llama_kv1", {}),
    "llama/attn_dp2": ("llama", {"attn_tp": 1, "dense_tp": 2}),
}


def batch_of(rank: int, cfg: dict) -> int:
    """Data-parallel attention: rank r runs batch r + 1 (different tokens); otherwise both run batch 0."""
    return rank + 1 if cfg.get("attn_tp") == 1 else 0


def run_batch(model, batch: int) -> torch.Tensor:
    prompts, decodes = BATCHES[batch]
    drv = PagedDriver(model, seed=3)
    seqs = [Seq([]) for _ in prompts]
    out = [drv.run(seqs, prompts, ForwardMode.EXTEND)]
    for step in decodes:
        out.append(drv.run(seqs, [[t] for t in step[: len(seqs)]], ForwardMode.DECODE))
    return torch.cat(out)


def _worker(rank: int, world: int, paths: dict, out_dir) -> None:
    for name, (ckpt, cfg) in CASES.items():
        ctx = ParallelContext.from_distributed(ParallelConfig(world_size=world, **cfg))
        model = load_model(paths[ckpt], dtype=torch.float32, device="cpu", parallel=ctx, progress=False)
        with torch.no_grad():
            logits = run_batch(model, batch_of(rank, cfg))
        tag = name.replace("/", "_")
        torch.save({"logits": logits, "collectives": model.spmd_program.collectives()}, out_dir / f"{tag}.{rank}.pt")


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    paths = {}
    for name, config in {
        "deepseek": tiny_deepseek_hf_config(vocab_size=95),
        "llama": tiny_llama_hf_config(vocab_size=95),
        "llama_kv1": tiny_llama_hf_config(num_key_value_heads=1, tie_word_embeddings=False),
    }.items():
        paths[name] = tmp_path_factory.mktemp(name)
        build_hf(config, seed=5).save_pretrained(paths[name], max_shard_size="200KB")
    out = tmp_path_factory.mktemp("tp_out")
    run_distributed(_worker, 2, paths, out)
    return paths, out


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one(tp_results, case):
    paths, out = tp_results
    ckpt, cfg = CASES[case]
    single = load_model(paths[ckpt], dtype=torch.float32, device="cpu", progress=False)
    for rank in range(2):
        got = torch.load(out / f"{case.replace('/', '_')}.{rank}.pt")["logits"]
        with torch.no_grad():
            ref = run_batch(single, batch_of(rank, cfg))
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-5, f"rank {rank}"


def test_emitted_collectives(tp_results):
    _, out = tp_results

    def collectives(case: str) -> list[str]:
        return torch.load(out / f"{case.replace('/', '_')}.0.pt")["collectives"]

    tp = collectives("deepseek/tp2")
    # 3 layers x 2 residual norms + the final norm; then the vocabulary all-gather
    assert tp == ["fused_allreduce_residual_rmsnorm(attn)"] * 7 + ["all_gather(attn, dim=-1)"]
    dp = collectives("deepseek/attn_dp2+ep2")
    assert (
        dp
        == ["all_gather(cross(attn,dense), dim=0)", "reduce_scatter(cross(attn,dense), dim=0)"]
        + ["all_gather(cross(attn,moe), dim=0)", "reduce_scatter(cross(attn,moe), dim=0)"] * 2
    )
    split = collectives("deepseek/tp2+token_split_dense")
    assert split[:4] == [
        "fused_allreduce_residual_rmsnorm(attn)",
        "fused_allreduce_residual_rmsnorm(attn)",
        "split(cross(dense,attn), dim=0)",
        "all_gather(cross(dense,attn), dim=0)",
    ]
