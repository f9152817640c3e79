#!/usr/bin/env bash
# MLA decode on the device: FlashInfer wheels, build, GPU tests of the Triton backend, then
# the benchmark (our backends beside FlashInfer 0.5.3 fa3). Carry .whl and .whl-fi.
# Extra arguments go to the benchmark (e.g. --shapes quick, --sweep, --kv-dtype fp8).
# Logs and the JSON land in $OUT (./out outside the device tool); the table prints last.
source "$(dirname "$0")/device_env.sh"
ts_flashinfer
ts_gpu_info
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ts_build

tests_rc=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_mla_decode_triton.py > "$OUT/mla_decode_tests.log" 2>&1 || tests_rc=$?
tail -n 25 "$OUT/mla_decode_tests.log"
echo "gpu tests exit code: $tests_rc"

bench_rc=0
python3 benchmarks/bench_mla_decode.py --json "$OUT/mla_decode_bench.json" "$@" > "$OUT/mla_decode_bench.log" 2>&1 || bench_rc=$?
grep -v "^  sweep" "$OUT/mla_decode_bench.log" | tail -n 60
echo "benchmark exit code: $bench_rc"
exit $((tests_rc || bench_rc))
