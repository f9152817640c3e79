#!/usr/bin/env bash
# The sm90 MLA decode on the device, both consumer schedules: the GPU tests (every case under
# both, tests/kernels/test_mla_decode_sm90.py), then the issue-3 table under each schedule
# beside FlashInfer (TOKENSPEED_MLA_DECODE_SCHEDULE=lockstep|seesaw).
source "$(dirname "$0")/../device_env.sh"
set +e
ts_flashinfer
ts_build || exit 1
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_mla_decode_sm90.py > "$OUT/mla_decode_sm90_tests.log" 2>&1
echo "tests rc $?"; tail -n 2 "$OUT/mla_decode_sm90_tests.log"; grep -E "^(FAILED|E  )" "$OUT/mla_decode_sm90_tests.log" | head -8
for sch in lockstep seesaw; do
  echo "== $sch"
  TOKENSPEED_MLA_DECODE_SCHEDULE=$sch timeout 200 python3 benchmarks/bench_mla_decode.py --backends cuda_sm90,flashinfer \
    --shapes "${1:-all}" --json "$OUT/mla_decode_$sch.json" > "$OUT/mla_decode_$sch.log" 2>&1
  grep -E "^[0-9]+ \|" "$OUT/mla_decode_$sch.log" | cut -d'|' -f1-7,9,11
done
