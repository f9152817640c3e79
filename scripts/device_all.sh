#!/usr/bin/env bash
# One device call that verifies everything GPU-side, each part time-boxed so a hang (e.g. a
# barrier bug in a new kernel) cannot eat the call: build, the device-image throw probe, all
# gpu/sm90 tests file by file, then the MLA decode benchmark. Carry .whl and .whl-fi.
# Usage: bash scripts/device_all.sh tests          (build, probe, every GPU test file; < 10 min)
#        bash scripts/device_all.sh bench [quick|all]  (the MLA decode benchmark)
#        bash scripts/device_all.sh norm               (RMSNorm / SiLU-and-mul / rotary: Triton vs torch)
#        bash scripts/device_all.sh profile            (where a batch-1 decode step of the engine goes)
#        bash scripts/device_all.sh recheck [files...]  (only the named GPU test files, then the profile)
# Logs: one per part, packed into $OUT/device_all_logs.tgz (the device tool returns at most 8
# files); a summary table prints last, with the first failure lines of every failed part.
source "$(dirname "$0")/device_env.sh"
ts_flashinfer
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ts_build || exit 1
declare -a SUMMARY FAILURES
LOGS=$(mktemp -d)
part() {  # part NAME SECONDS CMD...: run with a timeout, log to $LOGS/NAME.log, remember the outcome
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS rc=0 log="$LOGS/$name.log"
  timeout "$secs" "$@" > "$log" 2>&1 || rc=$?
  local last; last=$(grep -E "passed|failed|error|PASS|FAIL" "$log" | tail -n 1 || true)
  SUMMARY+=("$(printf '%-28s rc=%-4s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "${last:0:90}")")
  if [ "$rc" != 0 ]; then
    FAILURES+=("== $name (rc $rc)" "$(grep -E "^(FAILED|E  )" "$log" | head -n 6 | cut -c1-400 || true)" "$(tail -n 3 "$log")")
  fi
}
finish() {
  tar -czf "$OUT/device_all_logs.tgz" -C "$LOGS" . && rm -rf "$LOGS"
  printf '%s\n' "${FAILURES[@]}"
  printf '%s\n' "${SUMMARY[@]}"
}
phase=${1:-tests}
if [ "$phase" = tests ]; then
part smoke 60 python3 scripts/device_smoke.py
part throw_probe 120 bash scripts/dev/throw_probe3.sh
# every test file with GPU-marked tests; the unverified sm90 kernels (prefill, MoE) last, so a
# hang there cannot hide the others' results
for f in tests/kernels/test_merge_attn_states_cuda.py tests/kernels/test_mla_decode_sm90.py \
         tests/kernels/test_mla_decode_triton.py tests/kernels/test_mla_prefill_triton.py tests/kernels/test_moe_triton.py \
         tests/kernels/test_mla_decode_fp8.py tests/kernels/test_kv_cache_write.py tests/engine/test_cuda_graph.py \
         tests/kernels/test_norm_ops.py tests/kernels/test_rotary_op.py \
         tests/kernels/test_mla_prefill_sm90.py tests/kernels/test_moe_sm90.py; do
  [ -f "$f" ] || continue
  part "$(basename "$f" .py)" 150 python3 -m pytest -q -x -m "gpu or sm90" -p no:cacheprovider "$f"
done
elif [ "$phase" = recheck ]; then
# the files whose fixes have not run on a GPU yet, then the decode-step profile, in one call
shift
for f in "$@"; do
  part "$(basename "$f" .py)" 240 python3 -m pytest -q -m "gpu or sm90" -p no:cacheprovider "$f"
done
part profile_decode 300 python3 scripts/dev/profile_decode_step.py --json "$OUT/decode_profile.json"
tail -n 34 "$LOGS/profile_decode.log"
elif [ "$phase" = norm ]; then
part bench_norm 120 python3 benchmarks/bench_norm.py --json "$OUT/norm_bench.json"
tail -n 12 "$LOGS/bench_norm.log"
elif [ "$phase" = profile ]; then
part profile_decode 400 python3 scripts/dev/profile_decode_step.py --json "$OUT/decode_profile.json"
tail -n 34 "$LOGS/profile_decode.log"
else
part bench_mla_decode 500 python3 benchmarks/bench_mla_decode.py --shapes "${2:-quick}" --json "$OUT/mla_decode_bench.json"
tail -n 30 "$LOGS/bench_mla_decode.log"
fi
finish
