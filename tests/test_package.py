"""The package imports, reports its build, and its CLI lists the kernels."""

from __future__ import annotations

import subprocess
import sys

import tokenspeed_kernels


def test_build_info_shape() -> None:
    info = tokenspeed_kernels.build_info()
    assert set(info) == {"cuda", "cuda_archs"}
    if info["cuda"]:
        assert "90a" in info["cuda_archs"]


def test_cli_list_prints_every_op() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tokenspeed_kernels", "list"], capture_output=True, text=True, check=True
    ).stdout
    for op in ("mla_decode", "mla_prefill", "merge_attn_states", "moe_route", "fused_moe"):
        assert op in out
    assert "this machine:" in out and "native_cpu" in out
