#!/usr/bin/env bash
# Round 2 of device checks: link probe for the image crash, sm90 decode tests without the
# error-path cases (they hit the crash), MoE GPU tests verbose with per-test durations.
source "$(dirname "$0")/../device_env.sh"
OUT=${OUT:-out}; mkdir -p "$OUT"
ts_build
timeout 120 bash scripts/dev/link_probe.sh > "$OUT/link_probe.log" 2>&1 || true
timeout 90 python3 -m pytest -q -m "gpu or sm90" -k "not rejects" -p no:cacheprovider tests/kernels/test_mla_decode_sm90.py > "$OUT/sm90.log" 2>&1 || true
timeout 330 python3 -m pytest -v -x -m gpu --durations=0 -p no:cacheprovider tests/kernels/test_moe_triton.py > "$OUT/moe.log" 2>&1 || true
tail -3 "$OUT/link_probe.log" "$OUT/sm90.log"; tail -25 "$OUT/moe.log"
