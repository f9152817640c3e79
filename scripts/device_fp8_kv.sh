#!/usr/bin/env bash
# FP8 latent KV cache (issue 8) on the device: GPU tests of the quantise-on-store write and the
# fp8 MLA decode, the fp8 decode benchmark on the quick shapes (beside our bf16 kernels on a bf16
# cache of the same shape), then, with the time left, the fp8 kernel's variant sweep on two
# memory-bound shapes. Each part is time-boxed so the whole fits in 4 minutes on a warm H100.
# Logs and JSON land in $OUT (./out outside the device tool); a short summary prints last.
source "$(dirname "$0")/device_env.sh"
start=$SECONDS
ts_gpu_info
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ts_build

left() { echo $((230 - (SECONDS - start))); }
box() {  # seconds for the next part: what is left, at most $1, at least 10
  local l
  l=$(left)
  [ "$l" -lt 10 ] && l=10
  [ "$l" -gt "$1" ] && l=$1
  echo "$l"
}

tests_rc=0
timeout "$(box 100)" python3 -m pytest -v -m gpu -p no:cacheprovider \
  tests/kernels/test_kv_cache_write.py tests/kernels/test_mla_decode_fp8.py > "$OUT/fp8_tests.log" 2>&1 || tests_rc=$?
[ $tests_rc -eq 124 ] && echo "gpu tests: TIMED OUT (partial log in $OUT/fp8_tests.log)"

bench_rc=0
timeout "$(box 90)" python3 benchmarks/bench_mla_decode.py --kv-dtype fp8 --shapes quick \
  --json "$OUT/fp8_bench.json" > "$OUT/fp8_bench.log" 2>&1 || bench_rc=$?
[ $bench_rc -eq 124 ] && echo "benchmark: TIMED OUT (partial log in $OUT/fp8_bench.log)"

sweep_rc=skipped
if [ "$(left)" -gt 40 ]; then
  sweep_rc=0
  timeout "$(box 200)" python3 benchmarks/bench_mla_decode.py --kv-dtype fp8 --shapes key --sweep --backends triton \
    --bf16-baseline "" --json "$OUT/fp8_sweep.json" > "$OUT/fp8_sweep.log" 2>&1 || sweep_rc=$?
fi

echo "== fp8 KV summary ($((SECONDS - start)) s) =="
echo "gpu tests (exit $tests_rc): $(grep -cE ' PASSED' "$OUT/fp8_tests.log") passed, $(grep -cE ' FAILED| ERROR' "$OUT/fp8_tests.log") failed"
grep -E ' FAILED| ERROR' "$OUT/fp8_tests.log" | head -n 10 || true
echo "benchmark (exit $bench_rc):"
grep -E '^(B \| H|[0-9]+ \| [0-9]+ \| )|fp8 target|copy .* GB/s' "$OUT/fp8_bench.log" || tail -n 15 "$OUT/fp8_bench.log"
echo "sweep (exit $sweep_rc):"
grep -E 'best config' "$OUT/fp8_sweep.log" 2>/dev/null || true
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
