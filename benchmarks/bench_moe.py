"""MoE: our grouped GEMMs and the whole routed-expert step beside torch's grouped GEMMs.

Lines: ``shape | backend | us | TFLOP/s | GB/s | % of roofline | x vs torch``.
* GEMM rows (DeepSeek-V3 expert shapes, every expert the same number of rows): triton is one
  ``moe_gemm`` launch (gate/up with its SwiGLU epilogue, or down with the routing-weight
  epilogue) on a precomputed alignment; cuda_sm90 is ``tokenspeed::grouped_gemm`` (the CUTLASS
  grouped GEMM of the sm90 fused_moe, its per-call argument set-up included; plain output,
  as torch's); torch is ``torch._grouped_mm`` (bf16) or ``torch._scaled_grouped_mm`` (fp8,
  row-wise scales: what torch offers; not the 1x128 / 128x128 block scales ours apply).
  FLOPs 2*E*rows*N*K; bytes = weights + activations in and out.
* fused rows: moe_route + fused_moe (our backends, selected through the registry by name)
  against the same pipeline from torch ops (torch routing, argsort, index gather, two
  grouped GEMMs, SiLU-and-mul, index_add combine). DeepSeek-V3: hidden 7168, 256 experts
  top-8, n_group 8 / topk_group 4. Bytes count the experts actually hit. Where the sm90
  heuristic picks its decode path (grouped GEMVs: bf16 <= 2 rows per expert, fp8 <= 1 row per
  4 experts), a "cuda_sm90 tiles" line times the same call on the CUTLASS tiles; up to 8 rows
  per expert, where it picks the tiles, a "cuda_sm90 decode" line forces the decode path.
Roofline: copy bandwidth and bf16 matmul rate measured in this run (fp8 roof: twice the bf16
rate, the Hopper ratio). Weights are far larger than L2; activations rotate over sets.

    python benchmarks/bench_moe.py [--only gemm|fused] [--gemm-rows all|large|decode] [--tokens 1,8,32,128,8192]
        --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Roofline, environment, measure_roofline, rotation_sets, time_back_to_back, write_json  # noqa: E402

from tokenspeed_kernels.env import MOE_SM90_TILE  # noqa: E402

HIDDEN, EXPERTS, TOP_K, N_GROUP, TOPK_GROUP = 7168, 256, 8, 8, 4
GEMM_ROWS = [  # (name, experts, rows per expert, N, K, fp8)
    ("gate/up", 64, 1024, 4096, 7168, False), ("down", 64, 1024, 7168, 2048, False),
    ("gate/up", 64, 1024, 4096, 7168, True), ("down", 64, 1024, 7168, 2048, True),
    ("gate/up", 256, 4, 4096, 7168, False), ("gate/up", 256, 4, 4096, 7168, True),
    ("gate/up", 32, 4, 4096, 7168, False), ("gate/up", 32, 4, 4096, 7168, True),
]  # fmt: skip


def fp8_weights(e: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16).mul_(8.0).to(torch.float8_e4m3fn)
    return w, torch.rand(e, n // 128, k // 128, device="cuda") * 0.01 + 1e-3


def report(rows: list[dict[str, Any]], shape: str, backend: str, us: float, mode: str, flops: float, nbytes: float,
           roof: Roofline, fp8: bool, base_us: float | None) -> None:  # fmt: skip
    mm = roof.matmul_tflops * (2 if fp8 else 1)
    roof_us = max(flops / (mm * 1e12), nbytes / (roof.copy_gbps * 1e9)) * 1e6
    vs = f"{base_us / us:.2f}x" if base_us else "-"
    row = dict(shape=shape, backend=backend, us=us, timing=mode, tflops=flops / us / 1e6, gbps=nbytes / us / 1e3,
               pct_roof=100 * roof_us / us, vs_torch=vs)  # fmt: skip
    rows.append(row)
    print(f"{shape:44} | {backend:9} | {us:9.1f} | {row['tflops']:7.1f} | {row['gbps']:7.0f} | {row['pct_roof']:5.1f}% | {vs}")


def timed(fn: Callable[[int], Any], n_sets: int, graph: bool) -> tuple[float | None, str]:
    try:
        return time_back_to_back(fn, n_sets, calls=20, repeats=5, graph=graph)
    except Exception as exc:  # a baseline op missing in this torch: say so, keep going
        print(f"  unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None, "-"


def sm90_available() -> bool:
    """The CUTLASS sm90 kernels need a Hopper GPU and a build with CUDA sources."""
    import tokenspeed_kernels

    return tokenspeed_kernels.build_info()["cuda"] and torch.cuda.get_device_capability()[0] == 9


def bench_gemms(roof: Roofline, rows: list[dict[str, Any]], graph: bool, which: str = "all") -> None:
    for row in GEMM_ROWS:
        large = row[2] >= 1024  # rows per expert: prefill-sized, else decode-sized
        if which == "all" or (which == "large") == large:
            bench_gemm_row(roof, rows, graph, *row)
        torch.cuda.empty_cache()


def bench_gemm_row(roof: Roofline, rows: list[dict[str, Any]], graph: bool, name: str, e: int, m: int, n: int, k: int,
                   fp8: bool) -> None:  # fmt: skip
    from tokenspeed_kernels.backends.moe_sm90 import grouped_gemm
    from tokenspeed_kernels.triton.fused_moe import moe_gemm, quant_fp8_per_token_group
    from tokenspeed_kernels.triton.moe_align import moe_align
    from tokenspeed_kernels.triton.moe_configs import moe_gemm_config

    gate_up = name == "gate/up"
    t = e * m
    ids = torch.arange(e, device="cuda", dtype=torch.int32).repeat_interleave(m)[:, None]
    w, ws = fp8_weights(e, n, k) if fp8 else (torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16), None)
    n_sets = rotation_sets(t * k * 2, roof.l2_bytes)
    xs = [torch.randn(t, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    qs = [quant_fp8_per_token_group(x) for x in xs] if fp8 else [(x, None) for x in xs]
    cfg = moe_gemm_config(t, e, n // 2 if gate_up else n, k, fp8, gate_up)
    align = moe_align(ids, e, cfg.block_m)
    rw = torch.rand(t, device="cuda")
    out = torch.empty(t, n // 2 if gate_up else n, device="cuda", dtype=torch.bfloat16 if gate_up else torch.float32)
    shape = f"{name} {'fp8' if fp8 else 'bf16'} {e}x{m} N{n} K{k}"
    flops = 2.0 * t * n * k
    nbytes = w.numel() * w.element_size() + t * k * (1 if fp8 else 2) + out.numel() * out.element_size()

    def ours(i: int) -> None:
        moe_gemm(qs[i][0], qs[i][1], w, ws, out, align, cfg, a_row_div=1, swiglu=gate_up,
                 route_weights=None if gate_up else rw)  # fmt: skip

    offs = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * m

    def sm90(i: int) -> None:
        grouped_gemm(qs[i][0], w, offs, qs[i][1], ws)

    if fp8:
        wt, sb = w.transpose(1, 2), ws.amax(-1).repeat_interleave(128, 1).contiguous()
        sa = torch.rand(t, device="cuda") * 0.01

        def base(i: int) -> None:
            torch._scaled_grouped_mm(qs[i][0], wt, sa, sb, offs=offs, out_dtype=torch.bfloat16)
    else:

        def base(i: int) -> None:
            torch._grouped_mm(xs[i], w.transpose(1, 2), offs=offs)

    base_us, base_mode = timed(base, n_sets, graph)
    us, mode = timed(ours, n_sets, graph)
    sm90_us, sm90_mode = timed(sm90, n_sets, graph) if sm90_available() else (None, "-")
    if base_us:
        report(rows, shape, "torch", base_us, base_mode, flops, nbytes, roof, fp8, None)
    if us:
        report(rows, shape, "triton", us, mode, flops, nbytes, roof, fp8, base_us)
    if sm90_us:
        report(rows, shape, "cuda_sm90", sm90_us, sm90_mode, flops, nbytes, roof, fp8, base_us)


def torch_moe(x, w13, w2, weights, ids, s13, s2):  # type: ignore[no-untyped-def]
    """The same step from torch ops (fp8: per-token row-wise scales, torch's only grouped fp8 form)."""
    t, k = ids.shape
    e, inter = w13.shape[0], w2.shape[2]
    flat = ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // k]
    if s13 is None:
        h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    else:
        sa = xs.abs().amax(-1).float().clamp_min(1e-10) / 448
        h = torch._scaled_grouped_mm((xs / sa[:, None]).to(torch.float8_e4m3fn), w13.transpose(1, 2), sa, s13, offs=offs,
                                     out_dtype=torch.bfloat16)  # fmt: skip
    act = F.silu(h[:, :inter]) * h[:, inter:]
    if s2 is None:
        y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    else:
        sa = act.abs().amax(-1).float().clamp_min(1e-10) / 448
        y = torch._scaled_grouped_mm((act / sa[:, None]).to(torch.float8_e4m3fn), w2.transpose(1, 2), sa, s2, offs=offs,
                                     out_dtype=torch.bfloat16)  # fmt: skip
    y = y.float() * weights.flatten()[order, None]
    return torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, order // k, y).to(x.dtype)


def bench_fused(roof: Roofline, rows: list[dict[str, Any]], tokens_list: list[int], inter: int, graph: bool) -> None:
    from tokenspeed_kernels import registry

    with registry.use_backend("triton", "moe_route"), registry.use_backend("triton", "fused_moe"):
        route = registry.select("moe_route", "cuda", torch.float32).load()
        moes = [("triton", registry.select("fused_moe", "cuda", torch.bfloat16).load())]
    if sm90_available():
        with registry.use_backend("cuda_sm90", "fused_moe"):
            moes.append(("cuda_sm90", registry.select("fused_moe", "cuda", torch.bfloat16).load()))
    for fp8 in (False, True):
        if fp8:
            w13, s13 = fp8_weights(EXPERTS, 2 * inter, HIDDEN)
            w2, s2 = fp8_weights(EXPERTS, HIDDEN, inter)
            rs13, rs2 = s13.amax(-1).repeat_interleave(128, 1).contiguous(), s2.amax(-1).repeat_interleave(128, 1).contiguous()
        else:
            w13 = torch.randn(EXPERTS, 2 * inter, HIDDEN, device="cuda", dtype=torch.bfloat16) * HIDDEN**-0.5
            w2 = torch.randn(EXPERTS, HIDDEN, inter, device="cuda", dtype=torch.bfloat16) * inter**-0.5
            s13 = s2 = rs13 = rs2 = None
        for t in tokens_list:
            bench_fused_row(roof, rows, graph, route, moes, t, inter, fp8, (w13, w2, s13, s2, rs13, rs2))
        del w13, w2, s13, s2, rs13, rs2
        torch.cuda.empty_cache()


def bench_fused_row(roof: Roofline, rows: list[dict[str, Any]], graph: bool, route: Callable[..., Any],
                    moes: list[tuple[str, Callable[..., Any]]], t: int, inter: int, fp8: bool,
                    weights: tuple[Any, ...]) -> None:  # fmt: skip
    from tokenspeed_kernels.reference.moe import moe_route_ref

    w13, w2, s13, s2, rs13, rs2 = weights
    bias = torch.rand(EXPERTS, device="cuda") * 0.1
    per_expert = (3 * inter * HIDDEN) * w13.element_size()
    n_sets = rotation_sets(t * (HIDDEN * 2 + EXPERTS * 4), roof.l2_bytes)
    xs = [torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    logits = [torch.randn(t, EXPERTS, device="cuda") for _ in range(n_sets)]
    hit = sum(int(moe_route_ref(lg, TOP_K, "sigmoid", bias, N_GROUP, TOPK_GROUP)[1].unique().numel()) for lg in logits)
    nbytes = hit / n_sets * per_expert + t * HIDDEN * 4
    flops = 6.0 * t * TOP_K * HIDDEN * inter
    shape = f"fused_moe {'fp8' if fp8 else 'bf16'} T{t} E{EXPERTS} top{TOP_K} I{inter}"

    def ours(moe: Callable[..., Any]) -> Callable[[int], torch.Tensor]:
        def step(i: int) -> torch.Tensor:
            w, ids = route(logits[i], TOP_K, "sigmoid", bias, N_GROUP, TOPK_GROUP, True, 2.5)
            return moe(xs[i], w13, w2, w, ids, s13, s2, 0)

        return step

    def base(i: int) -> torch.Tensor:
        w, ids = moe_route_ref(logits[i], TOP_K, "sigmoid", bias, N_GROUP, TOPK_GROUP, True, 2.5)
        return torch_moe(xs[i], w13, w2, w, ids, rs13, rs2)

    base_us, base_mode = timed(base, n_sets, graph)
    if base_us:
        report(rows, shape, "torch", base_us, base_mode, flops, nbytes, roof, fp8, None)
    for name, moe in moes:
        us, mode = timed(ours(moe), n_sets, graph)
        if us:
            report(rows, shape, name, us, mode, flops, nbytes, roof, fp8, base_us)
        if name != "cuda_sm90" or t * TOP_K > 8 * EXPERTS:
            continue
        # The other sm90 path, forced (the C++ launcher reads the variable at each call / capture).
        decode_default = t * TOP_K * 4 <= EXPERTS if fp8 else t * TOP_K <= 2 * EXPERTS  # moe_sm90_heuristics.h
        forced = ("large" if fp8 else "small") if decode_default else "decode"
        os.environ[MOE_SM90_TILE] = forced
        try:
            us, mode = timed(ours(moe), n_sets, graph)
        finally:
            del os.environ[MOE_SM90_TILE]
        if us:
            label = "cuda_sm90 tiles" if decode_default else "cuda_sm90 decode"
            report(rows, shape, label, us, mode, flops, nbytes, roof, fp8, base_us)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("gemm", "fused", "all"), default="all")
    ap.add_argument("--gemm-rows", choices=("all", "large", "decode"), default="all",
                    help="GEMM rows: 1024 rows per expert (large), 4 (decode), or both")  # fmt: skip
    ap.add_argument("--tokens", default="1,8,32,128,8192")
    ap.add_argument("--inter", type=int, default=2048, help="expert intermediate size of the fused rows")
    ap.add_argument("--timing", choices=("graph", "eager"), default="graph")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = environment()
    roof = measure_roofline()
    print(f"{env['device']} torch {env['torch']}: copy {roof.copy_gbps:.0f} GB/s, bf16 matmul {roof.matmul_tflops:.0f} TFLOP/s")
    print(f"{'shape':44} | backend   |        us | TFLOP/s |    GB/s | % roof | x vs torch")
    rows: list[dict[str, Any]] = []
    graph = args.timing == "graph"
    try:
        if args.only in ("gemm", "all"):
            bench_gemms(roof, rows, graph, args.gemm_rows)
        if args.only in ("fused", "all"):
            bench_fused(roof, rows, [int(t) for t in args.tokens.split(",")], args.inter, graph)
    finally:  # partial results still land in the JSON
        if args.json:
            write_json(args.json, {"env": env, "roofline": roof, "timing": args.timing, "rows": rows})
    print("\n| shape | backend | us | TFLOP/s | GB/s | % of roofline | x vs torch |\n|---|---|---|---|---|---|---|")
    for r in rows:
        cells = (r["shape"], r["backend"], f"{r['us']:.1f}", f"{r['tflops']:.1f}", f"{r['gbps']:.0f}", f"{r['pct_roof']:.1f}%")
        print("| " + " | ".join((*cells, r["vs_torch"])) + " |")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
