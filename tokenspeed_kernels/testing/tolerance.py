"""One tolerance table per op family, and comparisons that name the worst element.

A result passes when its relative Frobenius error ||a - b|| / ||b|| is under ``rel``
and every element satisfies |a - b| <= atol + rtol * |b|. NaN or Inf where the
reference is finite always fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rel: float  # bound on the relative Frobenius error
    atol: float  # elementwise absolute slack
    rtol: float  # elementwise relative slack


# Keyed by op family, then by the dtype the op computes in (inputs / outputs).
TOLERANCES: dict[str, dict[torch.dtype, Tolerance]] = {
    "attention": {
        torch.float64: Tolerance(1e-10, 1e-10, 1e-10),
        torch.float32: Tolerance(1e-5, 1e-5, 1e-4),
        torch.float16: Tolerance(3e-3, 3e-3, 2e-2),
        torch.bfloat16: Tolerance(1e-2, 2e-2, 5e-2),
        torch.float8_e4m3fn: Tolerance(1e-2, 2e-2, 5e-2),  # fp8 KV vs the dequantised cache
    },
    "lse": {  # log-sum-exp is float32 in every backend
        torch.float64: Tolerance(1e-6, 1e-5, 1e-6),
        torch.float32: Tolerance(1e-5, 1e-4, 1e-5),
        torch.float16: Tolerance(1e-3, 1e-2, 1e-3),
        torch.bfloat16: Tolerance(1e-3, 1e-2, 1e-3),
        torch.float8_e4m3fn: Tolerance(1e-3, 1e-2, 1e-3),
    },
    "moe": {
        torch.float64: Tolerance(1e-10, 1e-10, 1e-10),
        torch.float32: Tolerance(1e-5, 1e-5, 1e-4),
        torch.float16: Tolerance(5e-3, 5e-3, 3e-2),
        torch.bfloat16: Tolerance(1.5e-2, 2e-2, 6e-2),
        # fp8 experts: the kernel's GEMM accumulation (wgmma's reduced-precision accumulator
        # within a 128-deep k block) flips e4m3 roundings of the intermediate against the fp32
        # contract, and a flip near a group's amax moves outputs by up to ~0.1 (O(0.4) outputs).
        # Calibrated in tests/kernels/test_moe_sm90.py (noise admitted, a wrong scale caught).
        torch.float8_e4m3fn: Tolerance(3e-2, 0.15, 1e-1),
    },
    # RMSNorm / SiLU-and-mul against their references: same rounding steps, so only the fp32
    # sum order and the last bit of rsqrt / exp differ; after rounding, about 2 ulps of the dtype.
    "elementwise": {
        torch.float64: Tolerance(1e-12, 1e-12, 1e-12),
        torch.float32: Tolerance(1e-6, 1e-6, 1e-5),
        torch.float16: Tolerance(1e-3, 1e-4, 2e-3),
        torch.bfloat16: Tolerance(4e-3, 1e-3, 1.6e-2),
    },
    "routing_weights": {
        torch.float32: Tolerance(1e-6, 1e-6, 1e-5),
    },
    # fp8 KV cache. Rows are keyed by the cache dtype.
    # Quantise on store, compared in units of the scale (x / kv_scale against the stored code):
    # round-to-nearest e4m3 is off by at most half an ulp, i.e. 2^-4 relative (3 mantissa bits)
    # above 2^-6, and 2^-10 absolute among the subnormals. Exact bounds: any wider error is a bug.
    "kv_fp8_store": {
        torch.float8_e4m3fn: Tolerance(2**-4, 2**-10, 2**-4),
    },
    # Attention over the quantised cache against the unquantised one (fp64 both), O(1) data with
    # kv_scale 1: the quantisation itself costs about 4% relative (random data, measured); the
    # bound flags a lost or doubled scale, a wrong code, or a misread page, not rounding.
    "attention_fp8_quantised": {
        torch.float8_e4m3fn: Tolerance(8e-2, 0.5, 0.5),
    },
}


@dataclass
class Comparison:
    rel_error: float
    worst_index: tuple[int, ...] | None
    worst_actual: float
    worst_expected: float
    worst_excess: float  # |a-b| / (atol + rtol*|b|); <= 1 passes
    nonfinite: int  # elements NaN/Inf in actual but finite in expected
    tolerance: Tolerance

    @property
    def ok(self) -> bool:
        return self.nonfinite == 0 and self.rel_error <= self.tolerance.rel and self.worst_excess <= 1.0

    def report(self, what: str) -> str:
        return (
            f"{what}: rel error {self.rel_error:.3e} (limit {self.tolerance.rel:.1e}), worst element "
            f"{self.worst_index}: got {self.worst_actual:.6g}, expected {self.worst_expected:.6g} "
            f"({self.worst_excess:.2f}x its allowance), non-finite {self.nonfinite}"
        )


def compare(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> Comparison:
    """Compare in float64; positions where ``expected`` is -inf must be -inf in ``actual`` too."""
    a = actual.detach().to("cpu", torch.float64)
    b = expected.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: got {tuple(a.shape)}, expected {tuple(b.shape)}")
    same_inf = torch.isinf(b) & (a == b)
    finite_b = torch.isfinite(b)
    nonfinite = int((finite_b & ~torch.isfinite(a)).sum()) + int((torch.isinf(b) & ~same_inf).sum())
    a_f = torch.where(finite_b & torch.isfinite(a), a, torch.zeros_like(a))
    b_f = torch.where(finite_b, b, torch.zeros_like(b))
    diff = (a_f - b_f).abs()
    denom = float(b_f.norm())
    rel = float(diff.norm()) / denom if denom > 0 else float(diff.norm())
    excess = diff / (tol.atol + tol.rtol * b_f.abs())
    if excess.numel():
        flat = int(excess.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), excess.shape))
        return Comparison(rel, idx, float(a[idx]), float(b[idx]), float(excess[idx]), nonfinite, tol)
    return Comparison(rel, None, 0.0, 0.0, 0.0, nonfinite, tol)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, family: str, dtype: torch.dtype, what: str = "output"
) -> Comparison:
    """Assert within ``TOLERANCES[family][dtype]``; the failure message names the worst element."""
    result = compare(actual, expected, TOLERANCES[family][dtype])
    assert result.ok, result.report(what)
    return result
