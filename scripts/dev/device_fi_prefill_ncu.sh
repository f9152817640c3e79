#!/usr/bin/env bash
# FlashInfer's fa3 ragged prefill (the issue-4 baseline) under ncu on the device: one launch of
# 1 x 16K/16K non-causal, 16 heads (qk 192 / v 128), timed first without the profiler, then
# profiled with source counters; the SASS-level CSV lands in $OUT (compare with
# scripts/dev/device_prefill_probe.sh NCU=1 NCU_CASE=1). Carry .whl and .whl-fi.
source "$(dirname "$0")/../device_env.sh"
ts_flashinfer
cat > /tmp/fi_run.py <<'PY'
import sys, time, torch, flashinfer
torch.manual_seed(0)
n, h, lq, lk, causal = 1, 16, 16384, 16384, False
q = torch.randn(n * lq, h, 192, device="cuda", dtype=torch.bfloat16)
k = torch.randn(n * lk, h, 192, device="cuda", dtype=torch.bfloat16)
v = torch.randn(n * lk, h, 128, device="cuda", dtype=torch.bfloat16)
cq = torch.arange(n + 1, dtype=torch.int32, device="cuda") * lq
ck = torch.arange(n + 1, dtype=torch.int32, device="cuda") * lk
ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
w = flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa3")
w.plan(cq, ck, h, h, 192, head_dim_vo=128, causal=causal, sm_scale=192 ** -0.5,
       q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
for _ in range(3):
    w.run(q, k, v)
torch.cuda.synchronize()
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record()
for _ in range(reps):
    w.run(q, k, v)
e1.record()
torch.cuda.synchronize()
us = e0.elapsed_time(e1) * 1e3 / reps
print(f"flashinfer fa3 1 x 16K/16K non-causal 16 heads: {us:.1f} us, {2 * h * lq * lk * 320 / us * 1e-6:.1f} TFLOP/s")
PY
t0=$SECONDS
timeout 400 python3 /tmp/fi_run.py 20 2>&1 | tail -3
echo "fi first run (incl. JIT): $((SECONDS - t0)) s"
timeout 180 /usr/local/cuda/bin/ncu --kernel-name regex:"[Pp]refill|[Aa]ttention" --launch-skip 3 --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SourceCounters --section ComputeWorkloadAnalysis \
  --section LaunchStats --import-source yes --export "$OUT/fi_rep" python3 /tmp/fi_run.py 1 > "$OUT/fi_ncu.log" 2>&1 || echo "ncu exit $?"
tail -3 "$OUT/fi_ncu.log"
/usr/local/cuda/bin/ncu --import "$OUT/fi_rep.ncu-rep" --page details > "$OUT/fi_details.txt" 2>&1
/usr/local/cuda/bin/ncu --import "$OUT/fi_rep.ncu-rep" --page raw --csv > "$OUT/fi_raw.csv" 2>&1
/usr/local/cuda/bin/ncu --import "$OUT/fi_rep.ncu-rep" --page source --csv --print-source sass > "$OUT/fi_sass.csv" 2>&1
rm -f "$OUT/fi_rep.ncu-rep"
grep -E "Kernel|Registers|Shared Memory Config|Block Size|Grid Size|Throughput|Issue|Warp Cycles" "$OUT/fi_details.txt" | head -30
