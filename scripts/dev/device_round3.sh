#!/usr/bin/env bash
# Round 3: rebuild with the system g++ (device_env.sh), link probe with both compilers,
# the error-path tests that crashed under /opt/gcc, then the quick MLA decode benchmark.
source "$(dirname "$0")/../device_env.sh"
OUT=${OUT:-out}; mkdir -p "$OUT"
if compgen -G ".whl-fi/*.whl" >/dev/null && [ ! -f /tmp/site/.ts-fi-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-fi/*.whl
  touch /tmp/site/.ts-fi-installed
fi
ts_build
timeout 150 bash scripts/dev/link_probe.sh > "$OUT/link_probe.log" 2>&1 || true
timeout 60 python3 -m pytest -q -m "gpu or sm90" -p no:cacheprovider tests/kernels/test_merge_attn_states_cuda.py tests/kernels/test_mla_decode_sm90.py > "$OUT/rejects.log" 2>&1 || true
timeout 300 python3 benchmarks/bench_mla_decode.py --shapes quick --json "$OUT/mla_decode_bench.json" > "$OUT/bench.log" 2>&1 || true
tail -n 3 "$OUT/rejects.log"; tail -n 30 "$OUT/bench.log"
