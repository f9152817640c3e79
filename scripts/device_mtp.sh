#!/usr/bin/env bash
# MTP speculative decoding on the H100 (issue 9), Moonlight-16B-A3B shape + one MTP layer, random bf16
# weights (scripts/check_mtp_device.py): greedy identity k=0 vs k=3 (eager and CUDA graphs) with the
# perfect-draft construction (hard check) and on the plain random model (informational), then
# tokens/s per user at batch 1 for k=0 and k=3. Logs in $OUT; a table prints last. < 4 min.
source "$(dirname "$0")/device_env.sh"
T0=$SECONDS
ts_build || exit 1
rc=0
timeout 200 python3 scripts/check_mtp_device.py > "$OUT/mtp.log" 2>&1 || rc=$?
echo "== tail of mtp.log (rc=$rc; 124 = timed out)"
if grep -q '^SUMMARY' "$OUT/mtp.log"; then
  sed -n '/^SUMMARY/,$p' "$OUT/mtp.log"
else
  tail -n 40 "$OUT/mtp.log"
fi
echo "== done in $((SECONDS - T0)) s"
exit $rc
