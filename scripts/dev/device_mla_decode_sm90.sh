#!/usr/bin/env bash
# sm90 MLA decode on the device: build, its GPU tests, then the issue-3 table beside
# FlashInfer (graph timing). Extra arguments go to the benchmark (default: --shapes all).
source "$(dirname "$0")/../device_env.sh"
ts_flashinfer
ts_build
rc=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_mla_decode_sm90.py > "$OUT/mla_decode_sm90_tests.log" 2>&1 || rc=$?
tail -n 4 "$OUT/mla_decode_sm90_tests.log"
echo "gpu tests exit code: $rc"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--shapes all)
python3 benchmarks/bench_mla_decode.py --backends cuda_sm90,flashinfer --json "$OUT/mla_decode_bench.json" "${args[@]}" \
  > "$OUT/mla_decode_bench.log" 2>&1 || rc=$?
grep -E "^NVIDIA|^[0-9]+ \|" "$OUT/mla_decode_bench.log" | cut -d'|' -f1-7,9,11
exit $rc
