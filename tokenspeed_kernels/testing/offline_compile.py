"""Compile Triton kernels for a GPU this machine does not have (CI: no GPU, sm_90 target).

``offline_triton(target)`` swaps Triton's active driver for one that reports ``target`` and
makes every kernel launch a compile-only warm-up; the launchers run unchanged on CPU tensors
(their outputs are garbage), so each kernel compiles with exactly the specialisation and
constexprs a real call gives it, through Triton's own PTX + ptxas pipeline. What it catches
without a GPU: kernels that fail to compile for the target, and tiles whose shared memory
exceeds the SM's limit (they would fail at launch), and register spills (ptxas -v on the PTX
Triton produced, with Triton's own ptxas).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver
from triton.runtime.jit import JITFunction

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SMEM_BYTES = 227 * 1024  # opt-in dynamic shared memory per block on sm_90


@dataclass
class CompiledRecord:
    name: str
    shared: int  # bytes of shared memory the kernel needs
    num_warps: int
    num_stages: int
    registers: int  # per thread (ptxas -v)
    spill_bytes: int  # spill stores + spill loads (ptxas -v); 0 for a kernel that fits its registers
    ptx: str  # what Triton generated, for checks on the instructions it chose


def ptxas_stats(ptx: str, arch: str) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) of ``ptx`` from ptxas -v (Triton's ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log!r}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


class _OfflineDriver:
    """What ``JITFunction.run`` asks of the active driver, for a device that is not here."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def offline_triton(target: GPUTarget = HOPPER) -> Iterator[list[CompiledRecord]]:
    """Inside: every Triton launch compiles for ``target`` and launches nothing; yields the
    list of what was compiled (appended as launches happen)."""
    records: list[CompiledRecord] = []
    touched: list[JITFunction] = []
    original_run = JITFunction.run
    # the previous driver as it was (on a machine without a GPU Triton cannot build a default
    # one, so reset_active() would raise)
    saved_active = getattr(triton_driver, "_active", None)

    def compile_only(self: JITFunction, *args, grid, warmup, **kwargs):
        touched.append(self)
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        md = kernel.metadata
        regs, spills = ptxas_stats(kernel.asm["ptx"], f"sm_{target.arch}a" if target.arch == 90 else f"sm_{target.arch}")
        records.append(CompiledRecord(self.fn.__name__, md.shared, md.num_warps, md.num_stages, regs, spills, kernel.asm["ptx"]))
        return kernel

    triton_driver.set_active(_OfflineDriver(target))
    JITFunction.run = compile_only
    try:
        yield records
    finally:
        JITFunction.run = original_run
        triton_driver._active = saved_active
        for fn in touched:  # binders and kernels made for the offline target must not serve a real launch
            fn.device_caches.clear()


def shared_limit_ok(record: CompiledRecord, limit: int = HOPPER_SMEM_BYTES) -> bool:
    return record.shared <= limit


__all__ = ["HOPPER", "HOPPER_SMEM_BYTES", "CompiledRecord", "offline_triton", "ptxas_stats", "shared_limit_ok"]
