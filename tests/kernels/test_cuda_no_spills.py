"""Our hand-written CUDA kernels compile for sm_90a without register spills (`ptxas -v`) and
without ptxas serializing their wgmma (its C7520 "Potential Performance Loss" remark).

A spill or a serialized wgmma in the decode or prefill kernel is a silent slowdown of the hot
loop, so it fails CI like a compile error would (the sm90 decode's seesaw schedule carried a
C7520 for a session: a barrier wait between the wgmma of one commit group). The CUTLASS
grouped-GEMM instantiations are left out: their register use is CUTLASS's, and each takes
minutes to compile (the build compiles them anyway).
Needs nvcc (skipped without it, like the CUDA part of the build).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    "csrc/mla/decode/mla_decode_sm90_bf16.cu",
    "csrc/mla/decode/mla_decode_sm90_fp8.cu",
    "csrc/mla/decode/mla_decode_sm90_plan.cu",
    "csrc/mla/merge_attn_states.cu",
    "csrc/mla/prefill/mla_prefill_sm90_d192.cu",
    "csrc/moe/sm90/moe_sm90_permute.cu",
    "csrc/moe/sm90/moe_sm90_decode.cu",
    "csrc/moe/sm90/moe_sm90_decode_fp8.cu",
]
FUNCTION = re.compile(
    r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _ptxas_report(nvcc: str, source: str, tmp: Path) -> str:
    cmd = [nvcc, "-std=c++20", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-DTOKENSPEED_WITH_CUDA",
           "-gencode=arch=compute_90a,code=sm_90a", f"-I{ROOT / 'csrc'}", "-cubin", "-Xptxas", "-v",
           "-o", str(tmp / (Path(source).stem + ".cubin")), str(ROOT / source)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{source} does not compile for sm_90a:\n{done.stderr[-3000:]}"
    return done.stderr


def test_sources_list_is_complete() -> None:
    """A new .cu file is either checked here or is a CUTLASS instantiation."""
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu")}
    unlisted = {s for s in found - set(SOURCES) if not Path(s).name.startswith("grouped_gemm_sm90_")}
    assert not unlisted, f"add to SOURCES: {sorted(unlisted)}"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (the CUDA sources are not built either)")
def test_no_register_spills_or_serialized_wgmma_on_sm90(tmp_path: Path) -> None:
    nvcc = _nvcc()
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        reports = dict(zip(SOURCES, pool.map(lambda s: _ptxas_report(nvcc, s, tmp_path), SOURCES), strict=True))
    spills = []
    for source, log in reports.items():
        functions = FUNCTION.findall(log)
        assert functions, f"{source}: no ptxas function report in:\n{log[-2000:]}"
        spills += [f"{source}: {name} {st} B stores / {ld} B loads" for name, _, st, ld in functions if int(st) or int(ld)]
    assert not spills, "register spills:\n" + "\n".join(spills)
    serialized = [f"{source}: {line.strip()}" for source, log in reports.items() for line in log.splitlines()
                  if "C7520" in line or "wgmma.mma_async instructions are serialized" in line]  # fmt: skip
    assert not serialized, "ptxas serializes wgmma:\n" + "\n".join(serialized)
