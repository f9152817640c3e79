#!/usr/bin/env bash
# The fp8 decode's halves timed alone (scripts/dev/fp8_decode_probe.cu) on the device: the probe built
# for each configuration in parallel, then run. A configuration is PROBE[:SCHEDULE[:NVCC_DEFINES]]:
# PROBE 0 the kernel, 1 producers alone, 2 consumer alone, 3 producers loading without widening
# (mla_decode_sm90_trace.cuh); SCHEDULE 1 (default: transposed at <= 32 rows) or 0 (lockstep);
# defines comma-separated (NAME=VALUE), passed to nvcc as -D.
# Usage: bash scripts/dev/device_fp8_probe.sh [config ..]   (default: 0 1 2 3 0:0)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
mkdir -p "$OUT"
flags=(-std=c++20 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Icsrc)
srcs=(scripts/dev/fp8_decode_probe.cu csrc/mla/decode/mla_decode_sm90_fp8.cu csrc/mla/decode/mla_decode_sm90_plan.cu)
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(0 1 2 3 0:0)
t0=$SECONDS
i=0
for c in "${configs[@]}"; do
  IFS=: read -r probe sched defs <<< "$c"
  d=(-DTS_MLA_PROBE="$probe")
  for x in ${defs//,/ }; do d+=(-D"$x"); done
  nvcc "${flags[@]}" "${d[@]}" "${srcs[@]}" -o /tmp/fp8_probe_$i > "$OUT/probe_build$i.log" 2>&1 &
  i=$((i + 1))
done
wait
echo "probe builds: $((SECONDS - t0)) s"
i=0
for c in "${configs[@]}"; do
  IFS=: read -r probe sched defs <<< "$c"
  echo "## config $c"
  if [ -x /tmp/fp8_probe_$i ]; then timeout 30 /tmp/fp8_probe_$i "${sched:-1}" || echo "exit $?"; else echo "build failed"; tail -20 "$OUT/probe_build$i.log"; fi
  i=$((i + 1))
done
