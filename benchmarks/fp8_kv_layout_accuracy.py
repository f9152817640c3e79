"""Accuracy side of the fp8 latent-cache layout choice (issue 8), on the CPU.

Two layouts, both read by an absorbed MLA decode (576 values per token: 512 latent + 64 rope):

* per-tensor: all 576 values e4m3 with one float32 scale per layer (576 B per token);
* block (FlashMLA's documented fp8 layout): the 512 latent values e4m3 with one float32 scale
  per 128 values per token (amax / 448), the 64 rope values kept bf16 (656 B per token).

Attention outputs over each quantised cache are compared with fp64 attention over the
unquantised one (relative Frobenius error of out, max |lse error|), for latents drawn as the
engine produces them (RMS-normalised, O(1)) and with heavy-tailed outlier channels. The speed
side is bytes: at equal bandwidth the per-tensor layout reads 576 / 656 = 0.88 of the bytes.

    python benchmarks/fp8_kv_layout_accuracy.py
"""

from __future__ import annotations

import torch

from tokenspeed_kernels.reference import mla_decode_ref, quantize_e4m3

DIM, DV, ROPE = 576, 512, 64
SCALE = 192**-0.5


def per_tensor(kv: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.tensor([scale])
    return quantize_e4m3(kv, s).double() * scale


def block128(kv: torch.Tensor) -> torch.Tensor:
    nope, rope = kv[..., :DV].float(), kv[..., DV:]
    blocks = nope.reshape(*nope.shape[:-1], DV // 128, 128)
    s = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    q = (blocks / s).to(torch.float8_e4m3fn).double() * s.double()
    return torch.cat([q.reshape(nope.shape), rope.to(torch.bfloat16).double()], -1)


def latents(kind: str, tokens: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(tokens, DIM, generator=gen)
    if kind == "outlier channels":  # a few latent channels 30x larger, as activation outliers look
        x[:, torch.randperm(DV, generator=gen)[:8]] *= 30.0
    elif kind == "heavy tails":  # Student-t with 3 degrees of freedom
        x = x / torch.sqrt(torch.distributions.Chi2(3.0).sample((tokens, DIM)) / 3.0)
    return x


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, q_len, lens, page = 16, 1, [4096, 1500, 777], 64
    pages = sum(-(-n // page) for n in lens)
    table = torch.arange(pages, dtype=torch.int32).split([-(-n // page) for n in lens])
    width = max(len(t) for t in table)
    block_table = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in table])
    seqlens = torch.tensor(lens, dtype=torch.int32)
    print("latents | layout | bytes/token | out rel err | max |lse err|")
    for kind in ("normalised", "outlier channels", "heavy tails"):
        kv = latents(kind, pages * page, gen).reshape(pages, page, DIM)
        q = torch.randn(len(lens), q_len, heads, DIM, generator=gen).double()
        args = (block_table, seqlens, SCALE, True, DV)
        ref_out, ref_lse = mla_decode_ref(q, kv.double(), *args)
        amax = float(kv.abs().max())
        for name, deq, nbytes in (
            ("per-tensor, scale 1", per_tensor(kv, 1.0), 576),
            (f"per-tensor, scale amax/448 = {amax / 448:.3g}", per_tensor(kv, amax / 448), 576),
            ("block 128 + bf16 rope", block128(kv), 656),
        ):
            out, lse = mla_decode_ref(q, deq, *args)
            rel = float((out - ref_out).norm() / ref_out.norm())
            print(f"{kind} | {name} | {nbytes} | {rel:.3e} | {float((lse - ref_lse).abs().max()):.3e}")


if __name__ == "__main__":
    main()
