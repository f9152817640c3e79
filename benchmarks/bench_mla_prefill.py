"""MLA ragged prefill (non-absorbed, qk 192 / v 128): our backends (through the registry:
``cuda_sm90`` = the Hopper kernel of csrc/mla/prefill, ``triton`` = the portable one) beside
FlashInfer 0.5.3 fa3 and torch SDPA, same run.

One line per (case, backend): ``case | backend | us | TFLOP/s | % of matmul roof | x vs
FlashInfer | rel err``. FLOPs = 2 * heads * (visible q.k pairs) * (192 + 128): only unmasked
work, causal bottom-right aligned (query i of lq sees keys j <= lk - lq + i), as the anchors
count. The matmul roof is a bf16 8192^3 torch matmul measured in the same run. Timing: many
back-to-back eager launches between two CUDA events (each call is milliseconds, so launch
gaps do not matter), best of several repeats, inputs rotating over sets larger than L2.
SDPA runs only where it has the same semantics (one sequence, lq == lk) on its own
[1, H, L, D] layout.

    python benchmarks/bench_mla_prefill.py --json out.json [--backends triton,flashinfer,sdpa] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

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

DQK, DV = 192, 128
SCALE = DQK**-0.5
CASES = [  # (sequences, heads, new tokens per sequence, kv tokens per sequence incl. the new ones, causal)
    (1, 128, 8192, 8192, True),
    (1, 16, 16384, 16384, False),
    (4, 16, 1024, 81920, True),
    (4, 32, 1024, 81920, True),
    (8, 16, 512, 16384, True),
]
SWEEP = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2)]


def visible_pairs(lq: int, lk: int, causal: bool) -> int:
    """(query, key) pairs attended; causal bottom-right: row i sees min(lk, max(0, lk - lq + i + 1)) keys."""
    if not causal:
        return lq * lk
    return sum(min(lk, max(0, lk - lq + i + 1)) for i in range(lq))


def case_name(c: tuple[int, int, int, int, bool]) -> str:
    n, h, lq, lk, causal = c
    return f"{n} x {lq}/{lk} {'causal' if causal else 'non-causal'}, {h} heads"


class Inputs:
    """``n_sets`` independent packed (q, k, v) sets of one case, sharing the cu_seqlens."""

    def __init__(self, case: tuple[int, int, int, int, bool], n_sets: int) -> None:
        n, h, lq, lk, _ = case
        gen = torch.Generator(device="cuda").manual_seed(n * 1000003 + h * 1009 + lq + lk)
        rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
        self.q = [rnd(n * lq, h, DQK) for _ in range(n_sets)]
        self.k = [rnd(n * lk, h, DQK) for _ in range(n_sets)]
        self.v = [rnd(n * lk, h, DV) for _ in range(n_sets)]
        self.cu_q = torch.arange(n + 1, dtype=torch.int32, device="cuda") * lq
        self.cu_k = torch.arange(n + 1, dtype=torch.int32, device="cuda") * lk
        self.case = case


def set_bytes(case: tuple[int, int, int, int, bool]) -> int:
    n, h, lq, lk, _ = case
    return 2 * h * (n * lq * (DQK + DV) + n * lk * (DQK + DV))


def registry_backend(name: str) -> Callable[..., Any] | str:
    """The registered mla_prefill of backend ``name`` (a kernel) or why it is absent (a str)."""
    from tokenspeed_kernels import registry
    from tokenspeed_kernels.triton import register_triton_kernels

    if name == "triton" and not any(k.backend == "triton" for k in registry.kernels("mla_prefill")):
        register_triton_kernels()
    try:
        with registry.use_backend(name, "mla_prefill"):
            return registry.select("mla_prefill", "cuda", torch.bfloat16, head_dim_qk=DQK, head_dim_v=DV)
    except registry.NoKernelError as exc:
        return str(exc).splitlines()[0]


def ours(kernel: Callable[..., Any], inp: Inputs, config: Any = None) -> Callable[[int], Any]:
    _, _, lq, lk, causal = inp.case
    if config is not None:
        from tokenspeed_kernels.triton.mla_prefill import mla_prefill_with_config

        return lambda i: mla_prefill_with_config(inp.q[i], inp.k[i], inp.v[i], inp.cu_q, inp.cu_k, lq, lk, SCALE, causal,
                                                 config=config)  # fmt: skip
    return lambda i: kernel(inp.q[i], inp.k[i], inp.v[i], inp.cu_q, inp.cu_k, lq, lk, SCALE, causal)


def flashinfer_fn(inp: Inputs) -> Callable[[int], Any]:
    import flashinfer

    _, h, _, _, causal = inp.case
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa3")
    # FlashInfer's causal mask is bottom-right aligned for qo_len < kv_len, as ours.
    wrapper.plan(inp.cu_q, inp.cu_k, h, h, DQK, head_dim_vo=DV, causal=causal, sm_scale=SCALE,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)  # fmt: skip
    return lambda i: wrapper.run(inp.q[i], inp.k[i], inp.v[i])


def sdpa_fn(inp: Inputs) -> Callable[[int], Any] | str:
    import torch.nn.functional as F

    n, _, lq, lk, causal = inp.case
    if n != 1 or lq != lk:
        return "SDPA has no ragged batch or bottom-right causal mask"
    lay = lambda t: t.transpose(0, 1).unsqueeze(0).contiguous()  # noqa: E731  (its native [1, H, L, D])
    q, k, v = [lay(t) for t in inp.q], [lay(t) for t in inp.k], [lay(t) for t in inp.v]
    return lambda i: F.scaled_dot_product_attention(q[i], k[i], v[i], is_causal=causal, scale=SCALE).squeeze(0).transpose(0, 1)


def check(fn: Callable[[int], Any], inp: Inputs) -> float:
    """Relative error against fp64 on the last 256 queries of sequence 0, heads 0 and H-1 (guards against timing garbage)."""
    from tokenspeed_kernels.reference import mla_prefill_ref

    res = fn(0)
    out = res[0] if isinstance(res, tuple) else res
    _, h, lq, lk, causal = inp.case
    rows, heads = min(256, lq), [0, h - 1]
    q = inp.q[0][lq - rows : lq, heads].double()
    k, v = inp.k[0][:lk, heads].double(), inp.v[0][:lk, heads].double()
    cu_q = torch.tensor([0, rows], dtype=torch.int32)
    cu_k = torch.tensor([0, lk], dtype=torch.int32)
    ref, _ = mla_prefill_ref(q, k, v, cu_q, cu_k, rows, lk, SCALE, causal)
    got = out[lq - rows : lq, heads].double()
    return float((got - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="triton,cuda_sm90,flashinfer,sdpa")
    ap.add_argument("--cases", default="all", help="'all' or comma-separated indices into CASES")
    ap.add_argument("--calls", type=int, default=10, help="back-to-back calls per timed repeat")
    ap.add_argument("--sweep", action="store_true", help="time Triton tile configs per case (tuning aid)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    drop_flashinfer_if_missing(backends)

    roof: Roofline = measure_roofline()
    env = environment()
    print(f"{roof.device}, {roof.sm_count} SMs | bf16 8192^3 matmul {roof.matmul_tflops:.0f} TFLOP/s | "
          f"copy {roof.copy_gbps:.0f} GB/s | {env}")  # fmt: skip
    rows_out: list[dict[str, Any]] = []
    sweep_out: list[dict[str, Any]] = []
    for case in cases:
        n, h, lq, lk, causal = case
        flops = 2 * h * n * visible_pairs(lq, lk, causal) * (DQK + DV)
        inp = Inputs(case, rotation_sets(set_bytes(case), roof.l2_bytes))
        n_sets = len(inp.q)
        results: dict[str, dict[str, Any]] = {}
        for name in backends:
            try:
                if name == "flashinfer":
                    fn: Any = flashinfer_fn(inp)
                elif name == "sdpa":
                    fn = sdpa_fn(inp)
                else:
                    kernel = registry_backend(name)
                    fn = kernel if isinstance(kernel, str) else ours(kernel, inp)
                if isinstance(fn, str):
                    print(f"  {name}: not available for {case_name(case)} ({fn}); skipped")
                    continue
                err = check(fn, inp)
                us, mode = time_back_to_back(fn, n_sets, calls=args.calls, repeats=3, graph=False)
                results[name] = {"us": us, "rel_err": err, "timing": mode}
            except Exception as exc:  # one failing backend must not hide the others' numbers
                print(f"  {name} failed on {case_name(case)}: {type(exc).__name__}: {str(exc)[:300]}")
        if args.sweep and "triton" in backends:
            from tokenspeed_kernels.triton.mla_prefill import MlaPrefillConfig

            for tile in SWEEP:
                cfg = MlaPrefillConfig(*tile)
                try:
                    us, _ = time_back_to_back(ours(None, inp, cfg), n_sets, calls=max(2, args.calls // 2), repeats=2, graph=False)
                except Exception as exc:
                    us = float("nan")
                    print(f"  sweep {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
                sweep_out.append({"case": case_name(case), "config": cfg, "us": us, "tflops": flops / us / 1e6})
                print(f"  sweep {case_name(case)} {tile}: {us:.0f} us, {flops / us / 1e6:.0f} TFLOP/s")
        fi = results.get("flashinfer", {}).get("us")
        for name, r in results.items():
            r.update(case=case_name(case), sequences=n, heads=h, new_tokens=lq, kv_tokens=lk, causal=causal,
                     backend=name, tflops=flops / r["us"] / 1e6)  # fmt: skip
            r["pct_matmul_roof"] = 100 * r["tflops"] / roof.matmul_tflops
            r["x_vs_flashinfer"] = fi / r["us"] if fi else None
            rows_out.append(r)
        del inp
        torch.cuda.empty_cache()

    print(f"\nMLA prefill, qk {DQK} / v {DV}, bf16, matmul roof {roof.matmul_tflops:.0f} TFLOP/s, {roof.device}")
    print("case | backend | us | TFLOP/s | % of matmul roof | x vs FlashInfer | rel err")
    for r in rows_out:
        x = f"{r['x_vs_flashinfer']:.2f}" if r["x_vs_flashinfer"] else "-"
        print(f"{r['case']} | {r['backend']} | {r['us']:.0f} | {r['tflops']:.0f} | {r['pct_matmul_roof']:.1f}% | {x} | "
              f"{r['rel_err']:.1e}")  # fmt: skip
    if args.json:
        write_json(args.json, {"env": env, "roofline": roof, "results": rows_out, "sweep": sweep_out})


if __name__ == "__main__":
    main()
