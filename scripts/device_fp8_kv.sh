#!/usr/bin/env bash
# FP8 latent KV cache (issue 8) on the device: GPU tests of the sm90 fp8 decode kernel, the
# quantise-on-store write and the Triton fp8 decode, then the fp8 decode benchmark (cuda_sm90 and
# Triton on an fp8 cache, beside our bf16 kernels on a bf16 cache of the same shape). Each part is
# time-boxed so the whole fits in ~8 minutes on a fresh H100 (build included).
# Usage: bash scripts/device_fp8_kv.sh [shapes: all|quick|key|engine|compute, default all]
# Logs and JSON land in $OUT (./out outside the device tool); a short summary prints last.
source "$(dirname "$0")/device_env.sh"
start=$SECONDS
ts_gpu_info
ts_build || exit 1

left() { echo $((430 - (SECONDS - start))); }
box() {  # seconds for the next part: what is left, at most $1, at least 10
  local l
  l=$(left)
  [ "$l" -lt 10 ] && l=10
  [ "$l" -gt "$1" ] && l=$1
  echo "$l"
}

tests_rc=0
timeout "$(box 230)" python3 -m pytest -v -m gpu -p no:cacheprovider tests/kernels/test_mla_decode_sm90_fp8.py \
  tests/kernels/test_kv_cache_write.py tests/kernels/test_mla_decode_fp8.py > "$OUT/fp8_tests.log" 2>&1 || tests_rc=$?
[ $tests_rc -eq 124 ] && echo "gpu tests: TIMED OUT (partial log in $OUT/fp8_tests.log)"

bench_rc=0
timeout "$(box 150)" python3 benchmarks/bench_mla_decode.py --kv-dtype fp8 --shapes "${1:-all}" \
  --backends cuda_sm90,triton --bf16-baseline cuda_sm90 --json "$OUT/fp8_bench.json" > "$OUT/fp8_bench.log" 2>&1 || bench_rc=$?
[ $bench_rc -eq 124 ] && echo "benchmark: TIMED OUT (partial log in $OUT/fp8_bench.log)"

echo "== fp8 KV summary ($((SECONDS - start)) s) =="
echo "gpu tests (exit $tests_rc): $(grep -cE ' PASSED' "$OUT/fp8_tests.log") passed, $(grep -cE ' FAILED| ERROR' "$OUT/fp8_tests.log") failed"
grep -E ' FAILED| ERROR' "$OUT/fp8_tests.log" | head -n 10 || true
grep -E '^E  ' "$OUT/fp8_tests.log" | head -n 12 || true
echo "benchmark (exit $bench_rc):"
grep -E '^(B \| H|[0-9]+ \| [0-9]+ \| )|fp8 target|copy .* GB/s' "$OUT/fp8_bench.log" | cut -d'|' -f1-11 || tail -n 15 "$OUT/fp8_bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
