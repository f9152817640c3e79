"""RMSNorm, fused residual-add RMSNorm, SiLU-and-mul, the rotary embedding and the MLA latent write:
our Triton kernels vs the torch composite a user would write (the HF numerics of
``tokenspeed_kernels.reference``), on the device; the latent write also vs our own separate
kernels ("unfused": Triton rms_norm + rotary, cat, index_copy, the copy into the query).

One line per shape: ``shape | us | GB/s | % of copy roofline | x vs torch``. Timed as CUDA-graph
replays of back-to-back calls over input sets larger than L2 (``common.time_back_to_back``);
the roofline is the device-to-device copy bandwidth measured in the same run. At decode batch
sizes these ops are launch-bound: the point of the fused kernels is the us column there.

    python benchmarks/bench_norm.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, measure_roofline, rotation_sets, time_back_to_back, write_json  # noqa: E402

from tokenspeed_kernels.reference.mla_latent import mla_latent_write_ref  # noqa: E402
from tokenspeed_kernels.reference.norm import fused_add_rms_norm_ref, rms_norm_ref, silu_and_mul_ref  # noqa: E402
from tokenspeed_kernels.reference.rotary import rotary_embedding_ref  # noqa: E402
from tokenspeed_kernels.triton.mla_latent import mla_latent_write  # noqa: E402
from tokenspeed_kernels.triton.norm import fused_add_rms_norm, rms_norm, silu_and_mul  # noqa: E402
from tokenspeed_kernels.triton.rotary import rotary_embedding  # noqa: E402

# (op, rows, hidden): Moonlight hidden 2048 / DeepSeek 7168 at decode (1, 64) and prefill (8192)
# rows; SiLU-and-mul on the Moonlight expert (1408) and DeepSeek dense (18432) intermediates
SHAPES = [
    ("rms_norm", 1, 2048), ("rms_norm", 64, 7168), ("rms_norm", 8192, 7168),
    ("fused_add_rms_norm", 1, 2048), ("fused_add_rms_norm", 64, 7168), ("fused_add_rms_norm", 8192, 7168),
    ("silu_and_mul", 1, 1408), ("silu_and_mul", 64, 18432), ("silu_and_mul", 8192, 18432),
    # rotary: hidden = query heads (16 per rank / 128), rope dim 64, one latent k head (DeepSeek)
    ("rotary_embedding", 1, 16), ("rotary_embedding", 64, 128), ("rotary_embedding", 8192, 128),
    # latent write: hidden = query heads; latent 512 + rope 64 (DeepSeek / Moonlight), page 64
    ("mla_latent_write", 1, 16), ("mla_latent_write", 64, 16), ("mla_latent_write", 8192, 16),
]  # fmt: skip
BACKENDS = {"mla_latent_write": ("torch", "unfused", "triton")}


def bytes_moved(op: str, rows: int, hidden: int) -> int:
    """Minimum bytes read + written (bf16): what the roofline counts."""
    if op == "rms_norm":
        return 2 * (2 * rows * hidden + hidden)
    if op == "fused_add_rms_norm":
        return 2 * (4 * rows * hidden + hidden)
    if op == "rotary_embedding":
        return 2 * 2 * rows * (hidden + 1) * 64 + 8 * rows  # q and k read and written, positions
    if op == "mla_latent_write":
        return 2 * 2 * rows * (576 + hidden * 64) + 16 * rows + 2 * 512  # latent + q_pe in and out, ids
    return 2 * 3 * rows * hidden  # read [rows, 2h], write [rows, h]


def latent_write_unfused(t: dict[str, torch.Tensor]) -> None:
    """The engine's path before the fused op: five kernels."""
    c = rms_norm(t["lat"][:, :512], t["w512"], 1e-6)
    q_rot, k_rot = rotary_embedding(t["pos"], t["q"], t["lat"][:, 512:].unsqueeze(1), t["inv"], 1.3, True)
    t["cache"].view(-1, 576).index_copy_(0, t["slots"], torch.cat([c, k_rot[:, 0]], -1))
    t["qbuf"][..., 512:].copy_(q_rot)


def latent_args(t: dict[str, torch.Tensor]) -> tuple:
    return (t["pos"], t["lat"], t["w512"], 1e-6, t["q"], t["inv"], 1.3, True, t["cache"], t["slots"], t["qbuf"][..., 512:])


def make_call(op: str, backend: str, sets: list[dict[str, torch.Tensor]]):
    fns = {
        ("rms_norm", "triton"): lambda t: rms_norm(t["x"], t["w"], 1e-6),
        ("rms_norm", "torch"): lambda t: rms_norm_ref(t["x"], t["w"], 1e-6),
        ("fused_add_rms_norm", "triton"): lambda t: fused_add_rms_norm(t["x"], t["r"], t["w"], 1e-6),
        ("fused_add_rms_norm", "torch"): lambda t: fused_add_rms_norm_ref(t["x"], t["r"], t["w"], 1e-6),
        ("silu_and_mul", "triton"): lambda t: silu_and_mul(t["g"]),
        ("silu_and_mul", "torch"): lambda t: silu_and_mul_ref(t["g"]),
        ("rotary_embedding", "triton"): lambda t: rotary_embedding(t["pos"], t["q"], t["k"], t["inv"], 1.3, True),
        ("rotary_embedding", "torch"): lambda t: rotary_embedding_ref(t["pos"], t["q"], t["k"], t["inv"], 1.3, True),
        ("mla_latent_write", "triton"): lambda t: mla_latent_write(*latent_args(t)),
        ("mla_latent_write", "torch"): lambda t: mla_latent_write_ref(*latent_args(t)),
        ("mla_latent_write", "unfused"): latent_write_unfused,
    }
    fn = fns[(op, backend)]
    return lambda i: fn(sets[i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    roof = measure_roofline()
    print(f"{roof.device}, {roof.sm_count} SMs | copy {roof.copy_gbps:.0f} GB/s | {environment()}")
    print(f"{'shape':<34} | {'backend':<7} | {'us':>8} | {'GB/s':>7} | {'% roof':>6} | {'x vs torch':>10}")
    rows_out = []
    for op, rows, hidden in SHAPES:
        nbytes = bytes_moved(op, rows, hidden)
        n_sets = rotation_sets(nbytes, roof.l2_bytes)
        sets = []
        for _ in range(n_sets):
            width = 2 * hidden if op == "silu_and_mul" else hidden
            x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
            t = {"x": x, "g": x, "r": torch.randn_like(x), "w": torch.randn(hidden, device="cuda").bfloat16()}
            if op in ("rotary_embedding", "mla_latent_write"):  # DeepSeek's rope slices of the q and kv_a projections
                t["q"] = torch.randn(rows, hidden, 192, device="cuda").bfloat16()[..., 128:]
                t["k"] = torch.randn(rows, 576, device="cuda").bfloat16()[:, 512:].unsqueeze(1)
                t["pos"] = torch.randint(0, 65536, (rows,), device="cuda")
                t["inv"] = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, device="cuda").float() / 64))
            if op == "mla_latent_write":
                t["lat"] = torch.randn(rows, 1000 + 576, device="cuda").bfloat16()[:, 1000:]
                t["w512"] = torch.randn(512, device="cuda").bfloat16()
                pages = rows // 64 + 2
                t["cache"] = torch.zeros(pages, 64, 576, device="cuda", dtype=torch.bfloat16)
                t["slots"] = torch.randperm(pages * 64, device="cuda")[:rows]
                t["qbuf"] = torch.empty(rows, hidden, 576, device="cuda", dtype=torch.bfloat16)
            sets.append(t)
        backends = BACKENDS.get(op, ("torch", "triton"))
        times = {b: time_back_to_back(make_call(op, b, sets), n_sets)[0] for b in backends}
        for b in reversed(backends):
            us = times[b]
            gbps = nbytes / (us * 1e-6) / 1e9
            shape = f"{op} [{rows}, {hidden}]"
            print(f"{shape:<34} | {b:<7} | {us:8.2f} | {gbps:7.0f} | {100 * gbps / roof.copy_gbps:5.1f}% | "
                  f"{times['torch'] / us:9.2f}x")  # fmt: skip
            rows_out.append({"op": op, "rows": rows, "hidden": hidden, "backend": b, "us": us, "gbps": gbps})
    if args.json:
        write_json(args.json, {"roofline": vars(roof), "env": environment(), "rows": rows_out})


if __name__ == "__main__":
    main()
