#!/usr/bin/env bash
# Engine on the H100 (issue 12): CUDA-graph decode vs eager, overlap, and the server running a
# Moonlight-16B-A3B-shaped random-weight model. Carry .whl and .whl-serve (fastapi, uvicorn,
# pydantic: the device image has none of them). Logs in $OUT; a table prints last. < 4 min.
#   (a) scripts/check_engine_device.py graphs: graph replay == op-by-op bitwise, engine logits
#       bitwise at a bucket size, greedy tokens, host syncs in overlapped steps, step times;
#   (b) `tokenspeed serve --load-format random` with the Moonlight shape, a completion, a chat
#       completion and a batch-1 stream (decode tokens/s) with CUDA graphs, then without;
#       each server is stopped with SIGTERM and must exit 0.
source "$(dirname "$0")/device_env.sh"
if compgen -G ".whl-serve/*.whl" >/dev/null && [ ! -f /tmp/site/.ts-serve-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-serve/*.whl
  touch /tmp/site/.ts-serve-installed
fi
T0=$SECONDS
ts_build || exit 1
declare -a SUMMARY
note() { SUMMARY+=("$(printf '%-34s %s' "$1" "$2")"); }

# (a) graphs vs eager, in-process
rc=0
timeout 100 python3 scripts/check_engine_device.py graphs > "$OUT/graphs.log" 2>&1 || rc=$?
note "graphs: check rc=$rc" "$(grep -E '^(PASS|FAIL)$' "$OUT/graphs.log" | tail -n 1 || true)"
sed -n '/^SUMMARY/,$p' "$OUT/graphs.log" | sed 1d > "$OUT/graphs_table.txt" || true

# (b) the server with the Moonlight-shaped random model
MODEL_DIR=/tmp/moonlight-random
python3 -c "from tokenspeed_engine.random_checkpoint import write_random_checkpoint as w; \
from tokenspeed_engine.models.configs import moonlight_16b_a3b_config as c; w('$MODEL_DIR', c().to_hf())"
healthy() {  # healthy PORT: /health answers 200
  if command -v curl > /dev/null; then curl -sf "http://127.0.0.1:$1/health" > /dev/null 2>&1; return; fi
  python3 -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:$1/health', timeout=2).status != 200)" \
    > /dev/null 2>&1
}
serve() {  # serve LABEL SECONDS EXTRA_ARGS...: start, query, SIGTERM, record
  local label=$1 secs=$2; shift 2
  local port=$((18000 + RANDOM % 1000)) t0=$SECONDS log="$OUT/serve_$label.log"
  timeout "$secs" python3 -m tokenspeed_engine.cli serve --model "$MODEL_DIR" --load-format random --port "$port" \
    --kv-cache-tokens 65536 --page-size 64 --max-running-requests 16 "$@" > "$log" 2>&1 &
  local pid=$!
  local up=0
  for _ in $(seq 1 $((secs * 2))); do
    if healthy "$port"; then up=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  local started=$((SECONDS - t0)) crc=-1 src=-1
  if [ "$up" = 1 ]; then
    crc=0
    timeout 60 python3 scripts/check_engine_device.py client --url "http://127.0.0.1:$port" --label "$label" \
      > "$OUT/client_$label.log" 2>&1 || crc=$?
  fi
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" && src=0 || src=$?
  local tps; tps=$(grep -E '^DECODE_TPS' "$OUT/client_$label.log" 2>/dev/null | awk '{print $3}' || true)
  note "serve $label" "up=$up in ${started}s client_rc=$crc exit_after_SIGTERM=$src decode_tok/s(batch 1)=${tps:-none}"
}
serve graphs 65 --cuda-graph-max-bs 8
serve eager 55 --disable-cuda-graph

echo "== graphs check (full log: graphs.log)"
cat "$OUT/graphs_table.txt" 2>/dev/null || tail -n 30 "$OUT/graphs.log"
echo "== summary ($((SECONDS - T0)) s)"
printf '%s\n' "${SUMMARY[@]}"
