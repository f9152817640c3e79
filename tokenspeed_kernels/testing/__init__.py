"""Helpers every kernel test uses: paged-KV builders, tolerances, worst-element reports."""

from tokenspeed_kernels.testing.paged import PagedKV, make_paged_kv, ragged_seqlens
from tokenspeed_kernels.testing.tolerance import TOLERANCES, Tolerance, assert_close, compare

__all__ = ["PagedKV", "make_paged_kv", "ragged_seqlens", "TOLERANCES", "Tolerance", "assert_close", "compare"]
