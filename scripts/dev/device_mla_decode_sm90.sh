#!/usr/bin/env bash
# The sm90 MLA decode on the device: the GPU tests (every case under both consumer schedules,
# tests/kernels/test_mla_decode_sm90.py), then the issue-3 table beside FlashInfer under each
# variant. Usage: [VARIANTS="A=x,B=y C=z"] bash scripts/dev/device_mla_decode_sm90.sh [all|quick|compute]
# A variant is a comma-separated list of environment settings; the default compares the schedules.
source "$(dirname "$0")/../device_env.sh"
set +e
ts_flashinfer
ts_build || exit 1
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_mla_decode_sm90.py > "$OUT/mla_decode_sm90_tests.log" 2>&1
echo "tests rc $?"; tail -n 2 "$OUT/mla_decode_sm90_tests.log"; grep -E "^(FAILED|E  )" "$OUT/mla_decode_sm90_tests.log" | head -8
VARIANTS=${VARIANTS:-"TOKENSPEED_MLA_DECODE_SCHEDULE=lockstep TOKENSPEED_MLA_DECODE_SCHEDULE=seesaw"}
n=0
for v in $VARIANTS; do
  n=$((n + 1))
  echo "== $v"
  env ${v//,/ } timeout 200 python3 benchmarks/bench_mla_decode.py --backends cuda_sm90,flashinfer \
    --shapes "${1:-all}" --json "$OUT/mla_decode_v$n.json" > "$OUT/mla_decode_v$n.log" 2>&1
  grep -E "^[0-9]+ \|" "$OUT/mla_decode_v$n.log" | cut -d'|' -f1-7,9,11
done
