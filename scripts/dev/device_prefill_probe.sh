#!/usr/bin/env bash
# The sm90 MLA prefill kernel timed alone (scripts/dev/prefill_probe.cu) on the device, one build per
# configuration in parallel, then run one after the other. A configuration is a comma-separated list
# of NAME=VALUE defines passed to nvcc (kernel variants), or "-" for none. NCU=1 also profiles the
# first configuration's case NCU_CASE (default 5, the main loop) with ncu (source counters; report in $OUT).
# CASES=0,1,5 runs only those cases (prefill_probe.cu's list).
# Usage: [REPS=n] [CASES=..] bash scripts/dev/device_prefill_probe.sh [config ..]   (default: -)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}
mkdir -p "$OUT"
flags=(-std=c++20 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Icsrc -lineinfo)
srcs=(scripts/dev/prefill_probe.cu csrc/mla/prefill/mla_prefill_sm90_d192.cu)
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(-)
t0=$SECONDS
i=0
pids=()
for c in "${configs[@]}"; do
  d=()
  [ "$c" != "-" ] && for x in ${c//,/ }; do d+=(-D"$x"); done
  nvcc "${flags[@]}" "${d[@]}" "${srcs[@]}" -o /tmp/pf_probe_$i > "$OUT/pf_build$i.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p"; done
echo "probe builds: $((SECONDS - t0)) s"
# REPS > 1 runs the whole list again (A B A B ...): the clock moves with power and heat, so a
# comparison needs the configurations interleaved.
for rep in $(seq "${REPS:-1}"); do
  i=0
  for c in "${configs[@]}"; do
    echo "## config $c (round $rep)"
    if [ -x /tmp/pf_probe_$i ]; then timeout 60 /tmp/pf_probe_$i ${CASES:-} || echo "exit $?"; else echo "build failed"; tail -20 "$OUT/pf_build$i.log"; fi
    i=$((i + 1))
  done
done
if [ "${NCU:-0}" = 1 ] && [ -x /tmp/pf_probe_0 ]; then
  timeout 240 /usr/local/cuda/bin/ncu --kernel-name regex:mla_prefill --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --section ComputeWorkloadAnalysis \
    --import-source yes --export "$OUT/pf_rep" /tmp/pf_probe_0 "${NCU_CASE:-5}" > "$OUT/pf_ncu.log" 2>&1 || echo "ncu exit $?"
  /usr/local/cuda/bin/ncu --import "$OUT/pf_rep.ncu-rep" --page details > "$OUT/pf_details.txt" 2>&1
  /usr/local/cuda/bin/ncu --import "$OUT/pf_rep.ncu-rep" --page raw --csv > "$OUT/pf_raw.csv" 2>&1
  /usr/local/cuda/bin/ncu --import "$OUT/pf_rep.ncu-rep" --page source --csv --print-source sass > "$OUT/pf_sass.csv" 2>&1
  rm -f "$OUT/pf_rep.ncu-rep"
  grep -E "Throughput|Pipe|Issue|Warp Cycles|Eligible" "$OUT/pf_details.txt" | head -30
fi
