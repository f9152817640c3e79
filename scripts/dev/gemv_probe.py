"""Probe: can a Triton GEMV beat cuBLAS (F.linear) on the decode-step linears of the Moonlight-shaped
model? x [M, K] @ W[N, K]^T for M = 1 / 4 / 16, bf16, fp32 accumulation; weights rotated past L2.

Prints one line per (shape, variant): us, GB/s, % of copy bandwidth, x vs F.linear. A tuning aid,
not a test: nothing here is used by the engine.

    python scripts/dev/gemv_probe.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from common import measure_roofline, rotation_sets, time_back_to_back  # noqa: E402

# (N, K): fused q + kv_a projection, o_proj, shared experts gate/up and down, LM head slice
SHAPES = [(3648, 2048), (2048, 2048), (5632, 2048), (2048, 2816), (16384, 2048)]


@triton.jit
def _gemv_dot(X, W, OUT, M, N, K, stride_xm, stride_wn, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=(offs_m < M)[:, None] & k_ok[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                    mask=(offs_n < N)[None, :] & k_ok[:, None], other=0.0)  # fmt: skip
        acc = tl.dot(x, w, acc)
    out = OUT + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _gemv_fma(X, W, OUT, M, N, K, stride_xm, stride_wn, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    for m in tl.static_range(BLOCK_M):
        if m < M:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                x = tl.load(X + m * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                            mask=(offs_n < N)[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            tl.store(OUT + m * stride_om + offs_n, acc.to(OUT.dtype.element_ty), mask=offs_n < N)


def gemv(x: torch.Tensor, w: torch.Tensor, kind: str, bn: int, bk: int, warps: int, stages: int) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, bn),)
    if kind == "dot":
        _gemv_dot[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), BLOCK_M=16, BLOCK_N=bn,
                        BLOCK_K=bk, num_warps=warps, num_stages=stages)  # fmt: skip
    else:
        _gemv_fma[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), BLOCK_M=m, BLOCK_N=bn,
                        BLOCK_K=bk, num_warps=warps, num_stages=stages)  # fmt: skip
    return out


VARIANTS = [("dot", bn, bk, w, s) for bn in (16, 32) for bk in (128, 256) for w in (4,) for s in (4, 6)]
VARIANTS += [("fma", bn, bk, w, s) for bn in (8, 16) for bk in (256, 512) for w in (4,) for s in (3,)]


def main() -> None:
    roof = measure_roofline()
    print(f"{roof.device} | copy {roof.copy_gbps:.0f} GB/s")
    for m in (1, 4, 16):
        for n, k in SHAPES:
            nbytes = 2 * n * k
            n_sets = rotation_sets(nbytes, roof.l2_bytes)
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base, _ = time_back_to_back(lambda i, x=x, ws=ws: F.linear(x, ws[i]), n_sets)
            ref = F.linear(x, ws[0]).float()
            print(f"M={m:2d} N={n:5d} K={k:4d} | F.linear | {base:7.2f} us | {nbytes / base / 1e3:6.0f} GB/s | "
                  f"{100 * nbytes / base / 1e3 / roof.copy_gbps:5.1f}%")  # fmt: skip
            best = None
            for var in VARIANTS:
                if var[0] == "fma" and m > 4:
                    continue
                try:
                    got = gemv(x, ws[0], *var).float()
                    err = float((got - ref).abs().max() / ref.abs().max())
                    us, _ = time_back_to_back(lambda i, var=var, x=x, ws=ws: gemv(x, ws[i], *var), n_sets)
                except Exception as exc:  # a config that does not compile: skip it
                    print(f"   {var}: {type(exc).__name__}")
                    continue
                if best is None or us < best[0]:
                    best = (us, var, err)
            if best:
                us, var, err = best
                print(f"M={m:2d} N={n:5d} K={k:4d} | best {var} | {us:7.2f} us | {nbytes / us / 1e3:6.0f} GB/s | "
                      f"{100 * nbytes / us / 1e3 / roof.copy_gbps:5.1f}% | {base / us:5.2f}x | rel err {err:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
