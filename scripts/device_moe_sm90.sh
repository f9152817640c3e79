#!/usr/bin/env bash
# sm90 MoE on the device (issue 5): build, the Hopper MoE GPU tests (grouped GEMM bf16 / fp8
# block scales, fused_moe vs fp64/fp32 references, DeepSeek shapes, CUDA-graph replay,
# opcheck), then the benchmark's large grouped-GEMM rows (64 experts x 1024 rows) and the
# fused_moe rows (1, 8, 32, 128, 8192 tokens), torch / triton / cuda_sm90 side by side.
# Each part is time-boxed so the whole script stays under 6 minutes on an H100.
# MOE_TOKENS=1,8 picks the fused rows; MOE_SKIP_GEMM=1 skips the large grouped-GEMM rows.
# Logs and JSON land in $OUT (./out outside the device tool); a short table prints last.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
t_build=$SECONDS
ts_build
t_build=$((SECONDS - t_build))

t_tests=$SECONDS
tests_rc=0
timeout 160 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 tests/kernels/test_moe_sm90.py \
  > "$OUT/moe_sm90_tests.log" 2>&1 || tests_rc=$?
t_tests=$((SECONDS - t_tests))
grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s (call|setup)" "$OUT/moe_sm90_tests.log" | tail -n 30

t_gemm=$SECONDS
gemm_rc=0
: > "$OUT/moe_sm90_gemm.log"
[ "${MOE_SKIP_GEMM:-0}" = 1 ] || timeout 50 python3 benchmarks/bench_moe.py --only gemm --gemm-rows large --json "$OUT/moe_sm90_gemm.json" \
  > "$OUT/moe_sm90_gemm.log" 2>&1 || gemm_rc=$?
t_gemm=$((SECONDS - t_gemm))

t_fused=$SECONDS
fused_rc=0
timeout 110 python3 benchmarks/bench_moe.py --only fused --tokens "${MOE_TOKENS:-1,8,32,128,8192}" --json "$OUT/moe_sm90_fused.json" \
  > "$OUT/moe_sm90_fused.log" 2>&1 || fused_rc=$?
t_fused=$((SECONDS - t_fused))

grep -hv "^|" "$OUT/moe_sm90_gemm.log" "$OUT/moe_sm90_fused.log" | grep -Ei "unavailable|error|Traceback|failed" | head -n 10
echo
echo "| part | exit | seconds |"
echo "|---|---|---|"
echo "| build | 0 | $t_build |"
echo "| tests (test_moe_sm90.py -m gpu) | $tests_rc | $t_tests |"
echo "| bench gemm (large rows) | $gemm_rc | $t_gemm |"
echo "| bench fused_moe | $fused_rc | $t_fused |"
echo
# The rows as they were measured (the final markdown tables are in the logs when a run ends).
echo "shape | backend | us | TFLOP/s | GB/s | % roof | x vs torch"
grep -hE "^(gate/up|down|fused_moe) " "$OUT/moe_sm90_gemm.log" "$OUT/moe_sm90_fused.log" | tr -s ' ' || true
exit $((tests_rc || gemm_rc || fused_rc))
