"""Timing helpers shared by the kernel benchmarks.

The roofline of every benchmark is measured in the same run (a device-to-device copy for
bandwidth, a bf16 matmul for the matrix rate), so percentages compare against what this
card delivers today, not a datasheet. Kernels are timed back to back (many calls between
two CUDA events, best of several repeats), either as eager launches or as one CUDA graph
holding all the calls; inputs rotate over several sets whose sum exceeds L2.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Roofline:
    device: str
    sm_count: int
    l2_bytes: int
    copy_gbps: float  # device-to-device copy, bytes read + bytes written per second / 1e9
    matmul_tflops: float  # bf16 n x n x n through torch.matmul, random data


def _events_time_ms(fn: Callable[[], Any], reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def measure_copy_gbps(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Best of 3 batches of ``reps`` copies of ``nbytes``; counts read + write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    ms = min(_events_time_ms(lambda: dst.copy_(src), reps) for _ in range(3))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 ``n^3`` matmul on random data (zeros run faster and would flatter the roof)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ms = min(_events_time_ms(lambda: a @ b, reps) for _ in range(3))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_roofline() -> Roofline:
    props = torch.cuda.get_device_properties(0)
    return Roofline(
        device=props.name,
        sm_count=props.multi_processor_count,
        l2_bytes=int(getattr(props, "L2_cache_size", 50 << 20)),
        copy_gbps=measure_copy_gbps(),
        matmul_tflops=measure_matmul_tflops(),
    )


def rotation_sets(bytes_per_set: int, l2_bytes: int, min_sets: int = 2, max_sets: int = 8) -> int:
    """Input sets to rotate over so that consecutive calls never find their data in L2."""
    return max(min_sets, min(max_sets, math.ceil(4 * l2_bytes / max(1, bytes_per_set))))


def time_back_to_back(
    fn: Callable[[int], Any], n_sets: int, calls: int = 50, repeats: int = 5, graph: bool = True
) -> tuple[float, str]:
    """Microseconds per call of ``fn(set_index)``, best of ``repeats`` runs of ``calls`` calls.

    With ``graph`` the calls are captured once into a CUDA graph and the graph is replayed
    (no host launch gaps, as a decode step runs in an engine); if capture fails the eager
    loop is used. Returns (us, "graph" | "eager").
    """
    for i in range(max(3, n_sets)):  # warm-up: compilation, autotuning, workspace allocation
        fn(i % n_sets)
    torch.cuda.synchronize()
    mode = "eager"
    run: Callable[[], Any] = lambda: [fn(c % n_sets) for c in range(calls)]
    if graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn(0)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for c in range(calls):
                    fn(c % n_sets)
            g.replay()
            torch.cuda.synchronize()
            run, mode = g.replay, "graph"
        except Exception as exc:  # report, then time eagerly
            print(f"  (graph capture failed, timing eager launches: {type(exc).__name__}: {str(exc)[:120]})")
            torch.cuda.synchronize()
    best = min(_events_time_ms(run, 1) for _ in range(repeats))
    return best * 1e3 / calls, mode


def drop_flashinfer_if_missing(backends: list[str]) -> None:
    """Print FlashInfer's version, or remove it from ``backends`` (in place) when it does not
    import: the other backends still run, and the reason is in the log."""
    if "flashinfer" not in backends:
        return
    try:
        import flashinfer

        print(f"flashinfer {flashinfer.__version__}")
    except Exception as exc:
        print(f"flashinfer import failed, continuing without it: {type(exc).__name__}: {exc}")
        backends.remove("flashinfer")


def environment() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def write_json(path: str, payload: dict[str, Any]) -> None:
    def default(o: Any) -> Any:
        return asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)

    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=default)
