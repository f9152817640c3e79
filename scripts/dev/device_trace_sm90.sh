#!/usr/bin/env bash
# Timeline of the sm90 MLA decode (per-CTA event times and cycles per tile in each phase of
# the consumer loop) for a few shapes, from a trace build in its own build folder.
# Shapes: "B H S q_len" arguments (default: the issue-3 table's memory- and compute-bound rows).
source "$(dirname "$0")/../device_env.sh"
t0=$SECONDS
TOKENSPEED_MLA_TRACE=1 MAX_JOBS=16 python3 setup.py -q build_ext --inplace --build-temp .devbuild/temp-trace > "$OUT/trace_build.log" 2>&1 || { tail -30 "$OUT/trace_build.log"; exit 1; }
echo "trace build: $((SECONDS - t0)) s"
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=("1 16 65536 1" "128 16 4096 1" "32 16 4096 1" "128 128 4096 1" "4 16 81920 4")
for shape in "${shapes[@]}"; do
  timeout 60 python3 scripts/dev/mla_trace.py $shape > "$OUT/trace_${shape// /_}.log" 2>&1 || echo "trace $shape failed"
  grep -E "^B=|median|decode:|combine|cycles" "$OUT/trace_${shape// /_}.log"
done
