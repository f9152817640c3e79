#!/usr/bin/env bash
# The fused MLA latent write on the device: its GPU tests (and those of the norm / rotary kernels
# whose helpers it shares), the engine's graph and fusion tests with the fused op forced, the
# elementwise benchmark, then the batch-1 decode step without and with the fused op (forced either
# way with TOKENSPEED_KERNEL_BACKEND, whatever the registry's priority).
source "$(dirname "$0")/../device_env.sh"
ts_build
rc=0
L=$(mktemp -d)
FORCE=TOKENSPEED_KERNEL_BACKEND=mla_latent_write=triton
run() { local name=$1; shift; timeout 300 "$@" > "$L/$name.log" 2>&1 || { rc=1; echo "== $name failed"; grep -E "^(FAILED|E  )" "$L/$name.log" | head -8; }; echo "$name: $(tail -n 1 "$L/$name.log")"; }
run kernels python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_mla_latent_write.py tests/kernels/test_rotary_op.py tests/kernels/test_norm_ops.py
run engine_fused env $FORCE python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_cuda_graph.py tests/models/test_deepseek_v3_fusions.py tests/models/test_deepseek_v3_vs_hf.py
run bench_norm python3 benchmarks/bench_norm.py --json "$L/norm_bench.json"
grep -E "latent|rotary_embedding|shape" "$L/bench_norm.log"
# A/B, alternating (the graph wall time of one run moves by ~0.3 ms): without, with, without, with
for i in 1 2; do
  run "profile_base$i" env TOKENSPEED_KERNEL_BACKEND=mla_latent_write=reference python3 scripts/dev/profile_decode_step.py --json "$L/profile_base$i.json"
  run "profile_fused$i" env $FORCE python3 scripts/dev/profile_decode_step.py --json "$L/profile_fused$i.json"
done
for f in profile_base1 profile_fused1 profile_base2 profile_fused2; do echo "== $f: $(grep -E "kernels/step" "$L/$f.log")"; done
grep -E "^ *[0-9.]+ \|" "$L/profile_fused2.log" | head -12
tar -czf "$OUT/latent_write_logs.tgz" -C "$L" . && rm -rf "$L"
exit $rc
