"""Where does the sm90 MLA decode spend its time? Per-kernel device times (torch.profiler)
for decode vs combine, and a sweep of kv length at fixed B/H to split the fixed cost from the
per-tile cost (slope). Prints one line per point."""

from __future__ import annotations

import math

import torch
from torch.profiler import ProfilerActivity, profile

import tokenspeed_kernels  # noqa: F401

DIM, DV, PAGE = 576, 512, 64


def make(b: int, h: int, s: int, q_len: int):
    pages = math.ceil(s / PAGE)
    g = torch.Generator(device="cuda").manual_seed(1)
    bt = torch.randperm(b * pages, device="cuda", generator=g).to(torch.int32).view(b, pages)
    sl = torch.full((b,), s, dtype=torch.int32, device="cuda")
    q = torch.randn(b, q_len, h, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(b * pages, PAGE, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, kv, bt, sl


def flashinfer_call(b: int, h: int, s: int, q_len: int):
    """FlashInfer's fa3 MLA decode on the same inputs, as benchmarks/bench_mla_decode.py runs it."""
    import sys

    sys.path.insert(0, "benchmarks")
    from bench_mla_decode import Inputs, flashinfer_fn

    fn = flashinfer_fn(Inputs(b, h, s, q_len, torch.bfloat16, 1))
    return lambda: fn(0)


def kernel_times(b: int, h: int, s: int, q_len: int, reps: int = 30, flashinfer: bool = False) -> dict[str, float]:
    """Mean device time per call of each kernel. Ours: the combine kernel is launched with
    programmatic dependent launch, so its time includes waiting for the decode grid."""
    if flashinfer:
        call = flashinfer_call(b, h, s, q_len)
    else:
        q, kv, bt, sl = make(b, h, s, q_len)
        call = lambda: torch.ops.tokenspeed.mla_decode(q, kv, bt, sl, 192**-0.5, True, DV, None)  # noqa: E731
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count >= reps:
            out[ev.key[:40]] = ev.device_time_total / ev.count
    # Per call: first kernel start to last kernel end, and how far the last kernel ends after
    # the one before it (ours: the combine's tail after the decode grid).
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per_call = len(kernels) // reps
    if per_call >= 1:
        calls = [kernels[i * per_call : (i + 1) * per_call] for i in range(reps)]
        out["span"] = sorted(c[-1].time_range.end - c[0].time_range.start for c in calls)[reps // 2]
        if per_call >= 2:
            out["tail"] = sorted(c[-1].time_range.end - c[-2].time_range.end for c in calls)[reps // 2]
    return out


def main() -> None:
    import sys

    if len(sys.argv) == 5 and "," not in sys.argv[1]:  # one shape, a few calls: the target for ncu
        q, kv, bt, sl = make(*map(int, sys.argv[1:]))
        for _ in range(3):
            torch.ops.tokenspeed.mla_decode(q, kv, bt, sl, 192**-0.5, True, DV, None)
        torch.cuda.synchronize()
        return
    clk = torch.cuda.get_device_properties(0).clock_rate if hasattr(torch.cuda.get_device_properties(0), "clock_rate") else 0
    print("device", torch.cuda.get_device_name(0), "clock kHz", clk)
    flashinfer = "--flashinfer" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--flashinfer"]
    if args:  # points given as B,H,S,q_len
        pts = [tuple(int(x) for x in a.split(",")) for a in args]
    else:
        pts = [(1, 16, s, 1) for s in (4096, 8192, 16384, 32768, 65536, 131072)]
        pts += [(128, 16, s, 1) for s in (1024, 2048, 4096, 8192)]
        pts += [(128, 128, s, 1) for s in (1024, 2048, 4096)]
        pts += [(132, 16, 64, 1), (132, 16, 128, 1), (132, 16, 256, 1), (1, 16, 64, 1)]
    for b, h, s, ql in pts:
        t = kernel_times(b, h, s, ql, flashinfer=flashinfer)
        tot = t.get("span", sum(t.values()))
        mb = b * s * 1152 / 1e6
        desc = " | ".join(f"{k}: {v:.1f}" for k, v in sorted(t.items(), key=lambda kv: -kv[1]))
        print(f"B={b:4d} H={h:3d} S={s:6d} q={ql} | span {tot:7.1f} us | KV {mb:7.1f} MB -> {mb / tot * 1e3:6.0f} GB/s | {desc}")


if __name__ == "__main__":
    main()
