"""Import the package on the GPU machine and round-trip one CUDA op against the CPU."""

from __future__ import annotations

import torch

import tokenspeed_kernels as tk
from tokenspeed_kernels import registry


def main() -> None:
    info = tk.build_info()
    print("build_info:", info)
    assert info["cuda"], "the extension was built without CUDA"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, 512, generator=g), torch.randn(64, 16, 512, generator=g)
    la, lb = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    cpu = tk.merge_attn_states(a.bfloat16(), la, b.bfloat16(), lb)
    kernel = registry.select("merge_attn_states", "cuda", torch.bfloat16)
    gpu = kernel(a.bfloat16().cuda(), la.cuda(), b.bfloat16().cuda(), lb.cuda())
    torch.cuda.synchronize()
    d_out = (gpu[0].float().cpu() - cpu[0].float()).abs().max().item()
    d_lse = (gpu[1].cpu() - cpu[1]).abs().max().item()
    print(f"merge_attn_states round trip via backend {kernel.backend!r}: max |out diff| {d_out:.3e}, |lse diff| {d_lse:.3e}")
    assert kernel.backend == "cuda" and d_out < 2e-2 and d_lse < 1e-4


if __name__ == "__main__":
    main()
