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


def kernel_times(b: int, h: int, s: int, q_len: int, reps: int = 30) -> dict[str, float]:
    q, kv, bt, sl = make(b, h, s, q_len)
    op = torch.ops.tokenspeed.mla_decode
    for _ in range(3):
        op(q, kv, bt, sl, 192**-0.5, True, DV, None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            op(q, kv, bt, sl, 192**-0.5, True, DV, None)
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count >= reps:
            out[ev.key[:40]] = ev.device_time_total / ev.count
    return out


def main() -> None:
    import sys

    if len(sys.argv) == 5:  # one shape, a few calls: the target for ncu
        q, kv, bt, sl = make(*map(int, sys.argv[1:]))
        for _ in range(3):
            torch.ops.tokenspeed.mla_decode(q, kv, bt, sl, 192**-0.5, True, DV, None)
        torch.cuda.synchronize()
        return
    clk = torch.cuda.get_device_properties(0).clock_rate if hasattr(torch.cuda.get_device_properties(0), "clock_rate") else 0
    print("device", torch.cuda.get_device_name(0), "clock kHz", clk)
    pts = [(1, 16, s, 1) for s in (4096, 8192, 16384, 32768, 65536, 131072)]
    pts += [(128, 16, s, 1) for s in (1024, 2048, 4096, 8192)]
    pts += [(128, 128, s, 1) for s in (1024, 2048, 4096)]
    pts += [(132, 16, 64, 1), (132, 16, 128, 1), (132, 16, 256, 1), (1, 16, 64, 1)]
    for b, h, s, ql in pts:
        t = kernel_times(b, h, s, ql)
        tot = sum(t.values())
        mb = b * s * 1152 / 1e6
        desc = " | ".join(f"{k}: {v:.1f}" for k, v in sorted(t.items(), key=lambda kv: -kv[1]))
        print(f"B={b:4d} H={h:3d} S={s:6d} q={ql} | total {tot:7.1f} us | KV {mb:7.1f} MB -> {mb / tot * 1e3:6.0f} GB/s | {desc}")


if __name__ == "__main__":
    main()
