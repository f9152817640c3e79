#!/usr/bin/env bash
# The sm90 MLA prefill kernel (csrc/mla/prefill/) on the device: build, a smoke run that
# separates "hangs" from "wrong" from "right", the GPU tests, then the benchmark beside
# FlashInfer fa3 (the Triton and SDPA rows are in benchmarks/RESULTS.md already; add them with
# --backends cuda_sm90,flashinfer,triton,sdpa). Every part is time-boxed (45 + 100 + 300 s): a
# barrier or phase mistake in the kernel hangs instead of failing, and `timeout` turns that
# into a line of the table. The benchmark's box covers FlashInfer's JIT build of its kernels on
# a fresh machine (BENCH_TIMEOUT overrides it; SKIP_BENCH=1 skips it). Carry .whl and .whl-fi.
# Logs land in $OUT (./out outside the device tool); the table prints last. Under 4 minutes
# with a warm build (a cold build of the whole package adds its own time, capped at 10 minutes).
#
#   bash scripts/device_mla_prefill_sm90.sh [benchmark args, e.g. --cases 0,2]
source "$(dirname "$0")/device_env.sh"
ts_flashinfer
ts_gpu_info
export -f ts_build
build_rc=0
timeout 600 bash -c ts_build || build_rc=$?
[ "$build_rc" = 0 ] || { echo "build failed or timed out (rc $build_rc)"; exit 1; }

# 1. Smoke: growing shapes, each checked against fp64 right away (stdout line per shape).
smoke_rc=0
timeout 45 python3 - > "$OUT/prefill_sm90_smoke.log" 2>&1 <<'EOF' || smoke_rc=$?
import time, torch
import tokenspeed_kernels  # noqa: F401  (loads the ops)
from tests.kernels.test_mla_prefill_sm90 import gpu_reference, make_inputs
gen = torch.Generator().manual_seed(0)
for pairs, heads, causal in [([(1, 1)], 16, True), ([(128, 128)], 16, True), ([(128, 128)], 16, False),
                             ([(300, 1000), (5, 40)], 16, True), ([(2048, 2048)], 128, True),
                             ([(1024, 10240)] * 2, 16, True)]:
    q, k, v, cq, ck = make_inputs(pairs, heads, heads, gen, "cuda", poison=0)
    mq, mk = max(p[0] for p in pairs), max(p[1] for p in pairs)
    t0 = time.perf_counter()
    out, lse = torch.ops.tokenspeed.mla_prefill(q, k, v, cq, ck, mq, mk, 192**-0.5, causal)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    ro, rl = gpu_reference(q, k, v, cq, ck, 192**-0.5, causal)
    tq = int(cq[-1])
    err = float((out[:tq].double() - ro[:tq]).norm() / ro[:tq].norm())
    lerr = float((lse[:tq].double() - rl[:tq]).abs().nan_to_num(0.0).max())
    nan = int(torch.isnan(out[:tq]).sum())
    print(f"smoke {pairs} heads={heads} causal={causal}: rel err {err:.2e}, lse max abs err {lerr:.2e}, NaN {nan}, "
          f"first call {ms:.1f} ms", flush=True)
print("smoke done")
EOF
cat "$OUT/prefill_sm90_smoke.log"
if [ "$smoke_rc" = 124 ]; then echo "SMOKE TIMED OUT (a hang: the shape after the last line above)"; fi

# 2. GPU tests, verbose so that a hang names the test that was running (last line of the log).
tests_rc=0
timeout 100 python3 -m pytest -v -m "gpu or sm90" -p no:cacheprovider tests/kernels/test_mla_prefill_sm90.py \
  > "$OUT/prefill_sm90_tests.log" 2>&1 || tests_rc=$?
{ grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/prefill_sm90_tests.log" || true; } | sed 's/^tests\/kernels\/test_mla_prefill_sm90.py:://' | cut -c1-150
if [ "$tests_rc" = 124 ]; then echo "TESTS TIMED OUT; the last test named below was running:"; tail -3 "$OUT/prefill_sm90_tests.log"; fi
{ grep -E "^(FAILED|E  )" "$OUT/prefill_sm90_tests.log" || true; } | head -30

# 3. Benchmark (skipped when the smoke run hung: the same hang would eat the time box).
bench_rc=0
if [ "${SKIP_BENCH:-0}" = 1 ]; then
  echo "benchmark skipped (SKIP_BENCH=1)" > "$OUT/prefill_sm90_bench.log"
elif [ "$smoke_rc" != 124 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_mla_prefill.py --backends cuda_sm90,flashinfer \
    --json "$OUT/prefill_sm90_bench.json" "$@" > "$OUT/prefill_sm90_bench.log" 2>&1 || bench_rc=$?
else
  bench_rc=124
fi

echo
echo "== sm90 MLA prefill: smoke rc $smoke_rc, tests rc $tests_rc, benchmark rc $bench_rc =="
{ grep -E "passed|failed" "$OUT/prefill_sm90_tests.log" || true; } | tail -1
{ grep -E "^smoke" "$OUT/prefill_sm90_smoke.log" || true; } | cut -c1-110
sed -n '/^MLA prefill, qk/,$p' "$OUT/prefill_sm90_bench.log" 2>/dev/null || tail -5 "$OUT/prefill_sm90_bench.log"
exit $((smoke_rc || tests_rc || bench_rc))
