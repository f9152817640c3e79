#!/usr/bin/env bash
# MoE on the device: build, GPU tests of the Triton MoE backends, then the benchmark (our
# grouped GEMMs and moe_route + fused_moe beside torch._grouped_mm / _scaled_grouped_mm).
# Extra arguments go to the benchmark (e.g. --only gemm, --tokens 1,8,128, --timing eager).
# Logs and the JSON land in $OUT (./out outside the device tool); the table prints last.
source "$(dirname "$0")/device_env.sh"
ts_gpu_info
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ts_build

tests_rc=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_moe_triton.py > "$OUT/moe_tests.log" 2>&1 || tests_rc=$?
tail -n 30 "$OUT/moe_tests.log"
echo "gpu tests exit code: $tests_rc"

bench_rc=0
python3 benchmarks/bench_moe.py --json "$OUT/moe_bench.json" "$@" > "$OUT/moe_bench.log" 2>&1 || bench_rc=$?
grep -v "^|" "$OUT/moe_bench.log" | tail -n 20
grep "^|" "$OUT/moe_bench.log" || true
echo "benchmark exit code: $bench_rc"
exit $((tests_rc || bench_rc))
