#!/usr/bin/env bash
# Timeline of the sm90 MLA decode (per-CTA event times) for a few shapes, from a trace
# build in its own build folder; then the normal build is restored.
source "$(dirname "$0")/../device_env.sh"
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$SECONDS
TOKENSPEED_MLA_TRACE=1 MAX_JOBS=16 python3 setup.py -q build_ext --inplace --build-temp .devbuild/temp-trace > "$OUT/trace_build.log" 2>&1 || { tail -30 "$OUT/trace_build.log"; exit 1; }
echo "trace build: $((SECONDS - t0)) s"
for shape in "1 16 65536 1" "1 16 4096 1" "128 16 4096 1" "32 16 4096 1"; do
  timeout 60 python3 scripts/dev/mla_trace.py $shape > "$OUT/trace_${shape// /_}.log" 2>&1 || echo "trace $shape failed"
  grep -E "^B=|median|decode:|combine" "$OUT/trace_${shape// /_}.log"
done
ts_build
