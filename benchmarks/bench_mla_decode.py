"""MLA paged decode: our backends (through the registry) beside FlashInfer 0.5.3 fa3, same run.

One line per (shape, backend): ``B | H | kv len | q_len | backend | us | TFLOP/s | GB/s |
% of copy BW | x vs FlashInfer``. Bytes = KV read once (used tokens x 1152 B for bf16, 576 B
for fp8) + q + out; FLOPs = 2*B*H*q_len*S*(576+512) (the full S also for causal q_len > 1, as
the anchors count). DeepSeek dims, page size 64, random page order, all sequences of length S.

``--kv-dtype fp8`` (e4m3 cache, per-tensor scale) adds, per row: the time over the fp8 KV bytes'
time at the measured copy bandwidth (issue 8's target: within 1.15x on the memory-bound rows,
those whose FLOP per KV byte is below the matmul-rate / copy-bandwidth ridge), and the speed-up
over our own bf16 kernels on a bf16 cache of the same shape (``--bf16-baseline``), timed in
the same run. ``--sweep`` then times the fp8 kernel's variants (tile, prefetch, dot dtype) and
the bf16 kernel's in-register dequantisation path.

    python benchmarks/bench_mla_decode.py --shapes all --json out.json [--sweep]
    python benchmarks/bench_mla_decode.py --kv-dtype fp8 --shapes quick [--sweep --shapes key]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from tokenspeed_kernels.env import MLA_DECODE_MIN_SPLIT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Roofline,
    drop_flashinfer_if_missing,
    environment,
    measure_roofline,
    rotation_sets,
    time_back_to_back,
    write_json,
)

DIM, DV, PAGE = 576, 512, 64
DEVICE = "cuda"  # the CPU only for dry runs of this script under TRITON_INTERPRET=1
SCALE = 192**-0.5  # DeepSeek qk_head_dim ** -0.5
SHAPES = [  # (B, H, S, q_len)
    (1, 16, 65536, 1), (1, 16, 65536, 4), (4, 16, 81920, 1), (4, 16, 81920, 4), (4, 32, 81920, 4),
    (8, 16, 32768, 2), (32, 16, 4096, 1), (128, 16, 4096, 1), (128, 64, 8192, 1), (128, 128, 4096, 1),
    (64, 128, 8192, 2),
]  # fmt: skip
QUICK = [(1, 16, 65536, 1), (4, 16, 81920, 4), (32, 16, 4096, 1), (128, 16, 4096, 1), (128, 128, 4096, 1)]
KEY = [(1, 16, 65536, 1), (32, 16, 4096, 1)]  # memory-bound rows for short sweeps
# what an engine's decode step sees: batch 1 at growing contexts (Moonlight: 16 heads per rank)
ENGINE = [(1, 16, 1024, 1), (1, 16, 4096, 1), (1, 16, 16384, 1), (1, 16, 65536, 1), (4, 16, 4096, 1), (32, 16, 4096, 1)]
# rows with two or more 64-row blocks per key range: the tensor cores and the per-SM TMA ingest bind
COMPUTE = [(4, 32, 81920, 4), (128, 128, 4096, 1), (64, 128, 8192, 2)]
SHAPE_SETS = {"all": SHAPES, "quick": QUICK, "key": KEY, "engine": ENGINE, "compute": COMPUTE}
FP8_TARGET = 1.15  # issue 8: fp8 decode time within 1.15x of fp8 KV bytes / copy bandwidth


class Inputs:
    """``n_sets`` independent (q, kv_cache) pairs sharing one random-order block table."""

    def __init__(self, b: int, h: int, s: int, q_len: int, kv_dtype: torch.dtype, n_sets: int) -> None:
        pages = math.ceil(s / PAGE)
        gen = torch.Generator(device=DEVICE).manual_seed(b * 1000003 + h * 1009 + s + q_len)
        perm = torch.randperm(b * pages, device=DEVICE, generator=gen).to(torch.int32)
        self.block_table = perm.view(b, pages).contiguous()
        self.seqlens = torch.full((b,), s, dtype=torch.int32, device=DEVICE)
        self.q = [torch.randn(b, q_len, h, DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(n_sets)]
        self.kv = []
        for _ in range(n_sets):
            kv = torch.randn(b * pages, PAGE, DIM, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            self.kv.append(kv.to(kv_dtype) if kv_dtype != torch.bfloat16 else kv)
        self.kv_scale = torch.ones(1, dtype=torch.float32, device=DEVICE) if kv_dtype != torch.bfloat16 else None
        self.shape = (b, h, s, q_len)
        self.kv_name = "bf16" if kv_dtype == torch.bfloat16 else "fp8"


def registry_backend(name: str, kv_dtype: torch.dtype, q_len: int) -> Callable[..., Any] | str:
    """The registered mla_decode of backend ``name`` (a kernel) or why it is absent (a str)."""
    from tokenspeed_kernels import registry
    from tokenspeed_kernels.triton import register_triton_kernels

    if name == "triton" and not any(k.backend == "triton" for k in registry.kernels("mla_decode")):
        register_triton_kernels()  # until backends/__init__.py registers it itself
    try:
        with registry.use_backend(name, "mla_decode"):
            return registry.select(
                "mla_decode", "cuda", torch.bfloat16, page_size=PAGE, q_len=q_len, head_dim=DIM, kv_dtype=kv_dtype
            )
    except registry.NoKernelError as exc:
        return str(exc).splitlines()[0]


def ours(kernel: Callable[..., Any], inp: Inputs) -> Callable[[int], Any]:
    return lambda i: kernel(inp.q[i], inp.kv[i], inp.block_table, inp.seqlens, SCALE, True, DV, inp.kv_scale)


def with_config(inp: Inputs, cfg: Any) -> Callable[[int], Any]:
    from tokenspeed_kernels.triton.mla_decode import mla_decode_with_config

    def run(i: int) -> Any:
        return mla_decode_with_config(
            inp.q[i], inp.kv[i], inp.block_table, inp.seqlens, SCALE, True, DV, inp.kv_scale, config=cfg
        )

    return run


def flashinfer_fn(inp: Inputs) -> Callable[[int], Any]:
    import flashinfer

    b, h, s, q_len = inp.shape
    pages = inp.block_table.shape[1]
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(ws, backend="fa3")
    ar = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    wrapper.plan(ar * q_len, ar * pages, inp.block_table.flatten(), inp.seqlens, h, DV, DIM - DV, PAGE, True, SCALE,
                 torch.bfloat16, inp.kv[0].dtype)  # fmt: skip
    qs = [q.view(b * q_len, h, DIM) for q in inp.q]

    def run(i: int) -> Any:
        return wrapper.run(qs[i][..., :DV], qs[i][..., DV:], inp.kv[i][..., :DV], inp.kv[i][..., DV:], return_lse=True)

    return run


def check(fn: Callable[[int], Any], inp: Inputs, q_len: int) -> float:
    """Relative error of sequence 0 of set 0 against the fp64 reference (guards against timing garbage)."""
    from tokenspeed_kernels.reference import mla_decode_ref

    out = fn(0)[0].view(inp.q[0].shape[:3] + (DV,))[:1].double()
    kv = inp.kv[0].double() * (inp.kv_scale.double() if inp.kv_scale is not None else 1.0)
    ref, _ = mla_decode_ref(inp.q[0][:1].double(), kv, inp.block_table[:1], inp.seqlens[:1], SCALE, True, DV)
    return float((out - ref).norm() / ref.norm())


def sweep_configs(rows: int) -> list[Any]:
    """Tile shapes at two programs per SM, plus the default tile at 1 and 4 (split count)."""
    from dataclasses import replace

    from tokenspeed_kernels.triton.mla_decode import MlaDecodeConfig, default_config

    tiles = [(16, 32, 4, 2), (16, 32, 4, 3), (16, 32, 8, 3), (16, 16, 4, 4), (32, 32, 8, 2), (32, 32, 8, 3),
             (32, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2), (64, 16, 8, 4)]  # fmt: skip
    fit = max(16, 1 << (rows - 1).bit_length())
    cands = [MlaDecodeConfig(bh, bn, w, st, 2, 256) for bh, bn, w, st in tiles if bh <= fit]
    base = default_config(rows, torch.bfloat16)
    return cands + [replace(base, programs_per_sm=p) for p in (1, 4) if p != base.programs_per_sm]


def sweep_fp8_configs(rows: int) -> list[tuple[str, Any]]:
    """fp8 kernel variants (label, config), and the bf16 kernel's in-register bf16 dequantisation."""
    from dataclasses import replace

    from tokenspeed_kernels.triton.mla_decode import default_config
    from tokenspeed_kernels.triton.mla_decode_fp8 import MlaDecodeFp8Config, default_fp8_config

    tiles = [(16, 64, 8, 2, 1, True), (16, 32, 4, 3, 2, True), (16, 32, 4, 3, 2, False), (16, 64, 8, 2, 1, False),
             (16, 32, 8, 3, 1, True), (32, 32, 8, 3, 1, False), (32, 32, 8, 3, 1, True)]  # fmt: skip
    out = [("default", default_fp8_config(rows))]
    for bh, bn, w, st, pps, pf in tiles:
        if bh <= max(16, 1 << (rows - 1).bit_length()):
            label = f"bh={bh} bn={bn} w={w} st={st} pps={pps} {'prefetch' if pf else 'no-prefetch'}"
            out.append((label, MlaDecodeFp8Config(bh, bn, w, st, pps, 256, prefetch=pf)))
    base = default_fp8_config(rows)
    out.append(("default, bf16 dots", replace(base, dot_fp16=False)))
    out.append(("default, pps x2 (more splits)", replace(base, programs_per_sm=2 * base.programs_per_sm)))
    out.append(("bf16 kernel's fp8 path (bf16 dequant)", ("legacy", default_config(rows, torch.float8_e4m3fn))))
    return out


def fp8_variant_fn(inp: Inputs, cfg: Any) -> Callable[[int], Any]:
    from tokenspeed_kernels.triton.mla_decode import mla_decode_with_config
    from tokenspeed_kernels.triton.mla_decode_fp8 import mla_decode_fp8_with_config

    if isinstance(cfg, tuple):  # ("legacy", MlaDecodeConfig): the bf16 kernel's KV_FP8 path
        run_cfg, fn = cfg[1], mla_decode_with_config
    else:
        run_cfg, fn = cfg, mla_decode_fp8_with_config

    def run(i: int) -> Any:
        return fn(inp.q[i], inp.kv[i], inp.block_table, inp.seqlens, SCALE, True, DV, inp.kv_scale, config=run_cfg)

    return run


def time_backends(names: list[str], inp: Inputs, kv_dtype: torch.dtype, q_len: int, timing: str,
                  label_suffix: str = "") -> dict[str, dict[str, Any]]:  # fmt: skip
    """{backend label: {us, rel_err, timing}} for each available backend on ``inp``."""
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            if name == "flashinfer":
                fn = flashinfer_fn(inp)
            else:
                kernel = registry_backend(name, kv_dtype, q_len)
                if isinstance(kernel, str):
                    print(f"  {name}{label_suffix}: not available ({kernel}); skipped")
                    continue
                fn = ours(kernel, inp)
            err = check(fn, inp, q_len)
            us, mode = time_back_to_back(fn, len(inp.q), graph=timing == "graph")
            results[name + label_suffix] = {"us": us, "rel_err": err, "timing": mode, "kv": inp.kv_name}
        except Exception as exc:  # one failing backend must not hide the others' numbers
            print(f"  {name}{label_suffix} failed on {inp.shape}: {type(exc).__name__}: {str(exc)[:300]}")
    return results


def sweep_min_split(inp: Inputs, q_len: int, values: list[int]) -> list[dict[str, Any]]:
    """The sm90 kernel timed at each smallest split size (64-key tiles per CTA), read per call."""
    kernel = registry_backend("cuda_sm90", torch.bfloat16, q_len)
    if isinstance(kernel, str):
        return []
    out, before = [], os.environ.get(MLA_DECODE_MIN_SPLIT)
    try:
        for v in values:
            os.environ[MLA_DECODE_MIN_SPLIT] = str(v)
            fn = ours(kernel, inp)
            err = check(fn, inp, q_len)
            us, _ = time_back_to_back(fn, len(inp.q), graph=True)
            out.append({"shape": list(inp.shape), "label": f"min_split={v}", "us": us, "rel_err": err})
            print(f"  sm90 min_split={v} {'|'.join(map(str, inp.shape))}: {us:.1f} us (rel err {err:.1e})")
    finally:
        if before is None:
            os.environ.pop(MLA_DECODE_MIN_SPLIT, None)
        else:
            os.environ[MLA_DECODE_MIN_SPLIT] = before
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="all")
    ap.add_argument("--backends", default="triton,cuda_sm90,flashinfer")
    ap.add_argument(
        "--bf16-baseline",
        default="triton,cuda_sm90",
        help="with --kv-dtype fp8: our backends timed on a bf16 cache of the same shape ('' for none)",
    )
    ap.add_argument("--timing", choices=("graph", "eager"), default="graph")
    ap.add_argument("--sweep", action="store_true", help="time Triton tile configs per shape (tuning aid)")
    ap.add_argument(
        "--min-split-sweep",
        default="",
        help="cuda_sm90: comma-separated values of TOKENSPEED_MLA_DECODE_MIN_SPLIT to time per shape (tuning aid)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    min_splits = [int(v) for v in args.min_split_sweep.split(",") if v.strip()]
    kv_dtype = torch.bfloat16 if args.kv_dtype == "bf16" else torch.float8_e4m3fn
    fp8 = kv_dtype != torch.bfloat16
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    baselines = [b.strip() for b in args.bf16_baseline.split(",") if b.strip()] if fp8 else []
    if fp8 and "flashinfer" in backends:
        print("flashinfer: fp8 latent KV not supported yet here (its fa3 e4m3 MLA module fails to build); skipped")
        backends.remove("flashinfer")
    drop_flashinfer_if_missing(backends)

    roof: Roofline = measure_roofline()
    env = environment()
    ridge = roof.matmul_tflops * 1e12 / (roof.copy_gbps * 1e9)  # FLOP per byte where compute and bandwidth meet
    print(f"{roof.device}, {roof.sm_count} SMs, L2 {roof.l2_bytes >> 20} MiB | copy {roof.copy_gbps:.0f} GB/s "
          f"(read+write) | bf16 8192^3 matmul {roof.matmul_tflops:.0f} TFLOP/s | ridge {ridge:.0f} FLOP/B | "
          f"timing: {args.timing} | {env}")  # fmt: skip
    kv_tok = DIM * (2 if kv_dtype == torch.bfloat16 else 1)
    rows_out: list[dict[str, Any]] = []
    sweep_out: list[dict[str, Any]] = []
    for b, h, s, q_len in SHAPE_SETS[args.shapes]:
        kv_bytes = b * s * kv_tok
        flops = 2 * b * h * q_len * s * (DIM + DV)
        inp = Inputs(b, h, s, q_len, kv_dtype, rotation_sets(kv_bytes, roof.l2_bytes))
        results = time_backends(backends, inp, kv_dtype, q_len, args.timing)
        if args.sweep and "triton" in backends:
            variants = sweep_fp8_configs(q_len * h) if fp8 else [(None, c) for c in sweep_configs(q_len * h)]
            for label, cfg in variants:
                fn = fp8_variant_fn(inp, cfg) if fp8 else with_config(inp, cfg)
                try:
                    err = check(fn, inp, q_len)
                    us, _ = time_back_to_back(fn, len(inp.q), calls=20, repeats=3)
                except Exception as exc:
                    err, us = float("nan"), float("nan")
                    print(f"  sweep {label or cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
                sweep_out.append({"shape": [b, h, s, q_len], "label": label, "config": cfg, "us": us, "rel_err": err})
                name = label or (f"bh={cfg.block_h} bn={cfg.block_n} w={cfg.num_warps} st={cfg.num_stages} "
                                 f"pps={cfg.programs_per_sm}")  # fmt: skip
                print(f"  sweep {b}|{h}|{s}|{q_len} {name}: {us:.1f} us (rel err {err:.1e})")
            mine = [r for r in sweep_out if r["shape"] == [b, h, s, q_len] and not math.isnan(r["us"])]
            if mine:
                best = min(mine, key=lambda r: r["us"])
                print(f"  best config for {b}|{h}|{s}|{q_len}: {best['label'] or best['config']} {best['us']:.1f} us")
        if min_splits and "cuda_sm90" in backends:
            sweep_out += sweep_min_split(inp, q_len, min_splits)
        del inp
        torch.cuda.empty_cache()
        if baselines:  # our bf16 kernels on a bf16 cache of the same shape
            inp16 = Inputs(b, h, s, q_len, torch.bfloat16, rotation_sets(2 * kv_bytes, roof.l2_bytes))
            results.update(time_backends(baselines, inp16, torch.bfloat16, q_len, args.timing, "/bf16"))
            del inp16
            torch.cuda.empty_cache()
        fi = results.get("flashinfer", {}).get("us")
        bf16_best = min((r["us"] for n, r in results.items() if n.endswith("/bf16")), default=None)
        for name, r in results.items():
            tok = DIM * (2 if r["kv"] == "bf16" else 1)
            nbytes = b * s * tok + b * q_len * h * (DIM + DV) * 2
            r.update(B=b, H=h, S=s, q_len=q_len, backend=name, tflops=flops / r["us"] / 1e6, gbps=nbytes / r["us"] / 1e3)
            r["pct_copy_bw"] = 100 * r["gbps"] / roof.copy_gbps
            r["x_vs_flashinfer"] = fi / r["us"] if fi else None
            # the KV read alone at the measured copy bandwidth, and whether the row is memory-bound
            r["x_kv_roof"] = r["us"] / (b * s * tok / (roof.copy_gbps * 1e3))
            r["memory_bound"] = flops / (b * s * tok) < ridge
            r["x_vs_bf16"] = bf16_best / r["us"] if (bf16_best and r["kv"] == "fp8") else None
            rows_out.append(r)

    print(f"\nMLA decode, kv {args.kv_dtype}, page {PAGE}, copy BW {roof.copy_gbps:.0f} GB/s, "
          f"matmul {roof.matmul_tflops:.0f} TFLOP/s, {roof.device}, timing {args.timing}")  # fmt: skip
    print(
        "B | H | kv len | q_len | backend | us | TFLOP/s | GB/s | % of copy BW | x KV-bytes/BW time | "
        "x vs FlashInfer | x vs our best bf16 | rel err"
    )
    for r in rows_out:
        x = f"{r['x_vs_flashinfer']:.2f}" if r["x_vs_flashinfer"] else "-"
        xb = f"{r['x_vs_bf16']:.2f}" if r["x_vs_bf16"] else "-"
        roof_x = f"{r['x_kv_roof']:.2f}" + ("" if r["memory_bound"] else " (compute-bound)")
        print(f"{r['B']} | {r['H']} | {r['S']} | {r['q_len']} | {r['backend']} | {r['us']:.1f} | {r['tflops']:.0f} | "
              f"{r['gbps']:.0f} | {r['pct_copy_bw']:.1f}% | {roof_x} | {x} | {xb} | {r['rel_err']:.1e}")  # fmt: skip
    for name in backends if fp8 else []:
        judged = [r for r in rows_out if r["kv"] == "fp8" and r["memory_bound"] and r["backend"] == name]
        ok = [r for r in judged if r["x_kv_roof"] <= FP8_TARGET]
        print(f"fp8 target (time <= {FP8_TARGET}x of fp8 KV bytes / copy BW on memory-bound rows, {name}): "
              f"{len(ok)} of {len(judged)} rows meet it")  # fmt: skip
    if args.json:
        write_json(args.json, {"env": env, "roofline": roof, "kv_dtype": args.kv_dtype, "timing": args.timing,
                               "results": rows_out, "sweep": sweep_out})  # fmt: skip


if __name__ == "__main__":
    main()
