# Sourced by every device script: carried wheels, in-place incremental build, paths.
# On a warm device machine .devbuild/ survives between calls, so ninja rebuilds only
# what changed. Usage: source scripts/device_env.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
# The image sets CXX=/opt/gcc/bin/g++; extensions built with it segfault on any ostream
# number insertion (scripts/dev/link_probe.sh). The system g++ 13 matches the runtime libstdc++.
export CXX=/usr/bin/g++ CC=/usr/bin/gcc
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if compgen -G ".whl/*.whl" >/dev/null && [ ! -f /tmp/site/.ts-installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  touch /tmp/site/.ts-installed
fi
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"
ts_build() {
  local t0=$SECONDS
  MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace --build-temp .devbuild/temp-syscxx \
    > .devbuild.log 2>&1 || { tail -60 .devbuild.log; return 1; }
  echo "build: $((SECONDS - t0)) s"
}

# $OUT: what the device tool brings back (./out elsewhere).
OUT=${OUT:-out}
mkdir -p "$OUT"
# FlashInfer wheels (carried in .whl-fi), for benchmarks and tests that compare with it.
ts_flashinfer() {
  if compgen -G ".whl-fi/*.whl" >/dev/null && [ ! -f /tmp/site/.ts-fi-installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-fi/*.whl
    touch /tmp/site/.ts-fi-installed
  fi
}
ts_gpu_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
}
