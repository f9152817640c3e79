#!/usr/bin/env bash
# Profile the sm90 MLA decode: per-kernel times over a kv-length sweep, then ncu sections
# for batch 1 / 64K (the worst row) and batch 128 / 16 heads / 4K.
source "$(dirname "$0")/../device_env.sh"
OUT=${OUT:-out}; mkdir -p "$OUT"
ts_build
timeout 120 python3 scripts/dev/profile_sm90.py > "$OUT/profile.log" 2>&1 || true
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for shape in "1 16 65536 1" "128 16 4096 1" "128 128 4096 1"; do
  tag=${shape// /_}
  timeout 150 "$NCU" --clock-control none -k regex:mla_decode -c 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
    python3 scripts/dev/profile_sm90.py $shape > "$OUT/ncu_$tag.log" 2>&1 || echo "ncu $tag rc $?"
done
cat "$OUT/profile.log"
