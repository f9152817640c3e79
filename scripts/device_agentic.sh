#!/usr/bin/env bash
# Agentic serving benchmark on the H100 (issue 10), in about 4 minutes:
#   1. a Moonlight-16B-A3B-shaped DeepseekV3 with random bf16 weights, saved as a checkpoint + word tokenizer
#      (benchmarks/serving/make_random_model.py; reused when the warm machine already has it);
#   2. the no-engine baseline: transformers generate() of that directory, one user, one turn (64 tokens);
#   3. `tokenspeed serve` of it, a measured copy/matmul roofline, and a short concurrency sweep with
#      shortened SWE-smith-shaped traces (benchmarks/serving/agentic.py; the batch-1 roofline check
#      comes from the concurrency-1 run);
#   4. the table (sweep + floors + batch 1 + baseline). JSON, PNG and logs land in $OUT.
# Carry .whl and .whl-serve (fastapi, uvicorn, starlette, pydantic: not in the device image).
# Extra arguments go to the sweep (e.g. --concurrency 1,8,32 --max-run-seconds 30).
source "$(dirname "$0")/device_env.sh"
if compgen -G ".whl-serve/*.whl" >/dev/null && [ ! -f /tmp/site/.ts-serve-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-serve/*.whl
  touch /tmp/site/.ts-serve-installed
fi
python3 -c "import fastapi, uvicorn, matplotlib" || { echo "fastapi/uvicorn/matplotlib missing: carry .whl-serve"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ts_build

# 32 GB of weights: in /dev/shm (memory) when it has room, so writing them is not held to disk speed
MODEL=/tmp/ts-moonlight-random
shm_free=$(df -k --output=avail /dev/shm 2>/dev/null | tail -n 1 || echo 0)
[ "${shm_free:-0}" -gt $((40 * 1024 * 1024)) ] && MODEL=/dev/shm/ts-moonlight-random
PORT=8765
# shortened SWE-smith shape: ~4K first turn, ~400 per later turn, 3-4 turns, 128 output tokens (ignore_eos)
TRACE=(--first-turn-tokens 4000 --later-turn-tokens 400 --min-turns 3 --max-turns 4 --output-tokens 128 --seed 0)
declare -A took
rc_model=0 rc_hf=0 rc_serve=0 rc_sweep=0

t=$SECONDS
timeout 60 python3 -m benchmarks.serving.make_random_model --out "$MODEL" --max-position-embeddings 32768 \
  > "$OUT/make_model.log" 2>&1 || rc_model=$?
took[model]=$((SECONDS - t)); tail -n 2 "$OUT/make_model.log" || true
[ "$rc_model" = 0 ] || { echo "model creation failed ($rc_model)"; exit 1; }

t=$SECONDS
timeout 55 python3 benchmarks/serving/agentic.py --backend hf --model "$MODEL" --device cuda --dtype bfloat16 \
  "${TRACE[@]}" --output-tokens 64 --hf-turns 1 --out "$OUT/hf_baseline.json" > "$OUT/hf_baseline.log" 2>&1 || rc_hf=$?
took[hf]=$((SECONDS - t)); grep -v "it/s\]" "$OUT/hf_baseline.log" | tail -n 3 || true

t=$SECONDS
python3 -m tokenspeed_engine.cli serve --model "$MODEL" --port $PORT --dtype bfloat16 --max-model-len 16384 \
  --page-size 64 --gpu-memory-utilization 0.85 > "$OUT/server.log" 2>&1 &  # 0.85: room for the roofline probe
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
timeout 60 python3 - "$PORT" "$SERVER" <<'EOF' || rc_serve=$?
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
while True:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
            break
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited during start-up")
    time.sleep(1)
EOF
took[serve_start]=$((SECONDS - t))
grep -E "KV pool|kernels on|Error|error" "$OUT/server.log" | head -n 5 || true
if [ "$rc_serve" = 0 ]; then
  t=$SECONDS
  timeout 75 python3 benchmarks/serving/agentic.py --base-url "http://127.0.0.1:$PORT" "${TRACE[@]}" \
    --concurrency 1,4,16 --conversations-per-slot 4 --max-run-seconds 15 --tokenizer "$MODEL" \
    --roofline-model "$MODEL" --measure-roofline --label "tokenspeed, Moonlight-shaped random bf16" \
    --out "$OUT/agentic.json" --requests-out "$OUT/agentic_requests.jsonl" "$@" > "$OUT/agentic.log" 2>&1 || rc_sweep=$?
  took[sweep]=$((SECONDS - t))
else
  echo "server did not come up ($rc_serve); last lines:"; tail -n 20 "$OUT/server.log"
fi
kill $SERVER 2>/dev/null || true
wait $SERVER 2>/dev/null || true
trap - EXIT

echo "seconds: model ${took[model]}, hf ${took[hf]}, server start ${took[serve_start]}, sweep ${took[sweep]:-0}"
echo "exit codes: hf $rc_hf, server start $rc_serve, sweep $rc_sweep (124 = timed out; the JSON keeps finished runs)"
grep -E "^run c=" "$OUT/agentic.log" || tail -n 15 "$OUT/agentic.log" 2>/dev/null || true
if [ -f "$OUT/agentic.json" ]; then
  base=(); [ -f "$OUT/hf_baseline.json" ] && base=(--baseline-json "$OUT/hf_baseline.json")
  python3 benchmarks/serving/agentic.py --replot "$OUT/agentic.json" ${base[@]+"${base[@]}"} --plot "$OUT/agentic.png"
elif [ -f "$OUT/hf_baseline.json" ]; then
  python3 benchmarks/serving/agentic.py --replot "$OUT/hf_baseline.json"
fi
exit $((rc_hf || rc_serve || rc_sweep))
