"""Every environment variable TokenSpeed reads, in one place.

This module imports nothing from the package (setup.py loads it by path), so it
must stay dependency-free.
"""

from __future__ import annotations

import functools
import os

# Build (setup.py)
CUDA_ARCHS = "TOKENSPEED_CUDA_ARCHS"  # ";"-separated, e.g. "90a" (default) or "90a;100a"; "none" = no CUDA
CUTLASS_HOME = "CUTLASS_HOME"  # CUTLASS checkout; default: headers of the nvidia-cutlass wheel
PTXAS_VERBOSE = "TOKENSPEED_PTXAS_VERBOSE"  # "1": print registers / spills per kernel
MLA_TRACE = "TOKENSPEED_MLA_TRACE"  # "1": sm90 MLA decode prints a per-CTA timeline (debug builds)
MAX_JOBS = "MAX_JOBS"  # parallel compile jobs (torch's variable); default: all cores
CCACHE = "TOKENSPEED_CCACHE"  # "0" disables ccache even when it is installed
SKIP_EXTENSIONS = "TOKENSPEED_SKIP_EXTENSIONS"  # "1": package metadata only (make builds in place)

# Runtime (tokenspeed_kernels)
KERNEL_BACKEND = "TOKENSPEED_KERNEL_BACKEND"  # "backend" or "op=backend,op=backend"
DISABLE_PLUGINS = "TOKENSPEED_DISABLE_PLUGINS"  # "1": skip entry-point plugins
DEBUG_CHECKS = "TOKENSPEED_DEBUG_CHECKS"  # "1": value checks that need a device sync
# "large" / "small": force the sm90 MoE GEMM tile; "decode": force the bf16 grouped-GEMV path (read in C++)
MOE_SM90_TILE = "TOKENSPEED_MOE_SM90_TILE"
MLA_DECODE_MIN_SPLIT = "TOKENSPEED_MLA_DECODE_MIN_SPLIT"  # 1..64: fewest 64-key tiles per sm90 decode split (C++)
MLA_DECODE_PLAN_WINDOW = "TOKENSPEED_MLA_DECODE_PLAN_WINDOW"  # 1..8: sm90 decode plan capacities tried (1: even split) (C++)
# seesaw (default; an fp8 cache runs the transposed consumer at <= 32 rows) | lockstep: sm90 decode consumers (C++)
MLA_DECODE_SCHEDULE = "TOKENSPEED_MLA_DECODE_SCHEDULE"

# Engine / server (tokenspeed_engine)
API_KEY = "TOKENSPEED_API_KEY"  # bearer token every endpoint but /health requires (same as --api-key)
SHARED_EXPERTS_STREAM = "TOKENSPEED_SHARED_EXPERTS_STREAM"  # "0": shared experts stay on the main stream

DEFAULT_CUDA_ARCHS = "90a"


def get(name: str, default: str = "") -> str:
    """The raw value of one of the variables above (default when unset)."""
    return os.environ.get(name, default)


def flag(name: str) -> bool:
    """True when the variable is set to 1/true/yes/on."""
    return get(name).strip().lower() in {"1", "true", "yes", "on"}


def cuda_archs() -> list[str]:
    """Arch list for nvcc ([] means build without CUDA sources)."""
    raw = get(CUDA_ARCHS, DEFAULT_CUDA_ARCHS).replace(",", ";")
    archs = [a.strip() for a in raw.split(";") if a.strip()]
    return [] if archs == ["none"] else archs


def backend_overrides() -> dict[str, str]:
    """Parse TOKENSPEED_KERNEL_BACKEND: {"*": b} or {op: backend, ...} (do not mutate the result)."""
    return _parse_backend_overrides(get(KERNEL_BACKEND))


@functools.lru_cache(maxsize=16)
def _parse_backend_overrides(raw: str) -> dict[str, str]:
    raw = raw.strip()
    if not raw:
        return {}
    out: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            op, backend = (s.strip() for s in part.split("=", 1))
            out[op] = backend
        else:
            out["*"] = part
    return out
